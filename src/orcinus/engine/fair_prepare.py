"""Prompt preparation threads that take clients in turn.

Tokenising is the expensive part of accepting a request (seconds for megabytes of text), and a
first-come-first-served pool let one client's big requests occupy every preparation thread: a
tiny request from someone else waited behind all of them (16.7 s instead of 0.4 s in issue 19).
Here each job belongs to a client (the server uses the peer address) and the threads serve the
clients round-robin, one job each, so a client waits for at most one job of each other client
that has work queued, never for their whole backlog. The server submits one job per prompt, so
a request of many prompts is spread over turns rather than taken as one block.
"""
from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Future
from typing import Any, Callable


class FairPreparer:
    def __init__(self, workers: int, name: str = "orcinus-prepare") -> None:
        self._cond = threading.Condition()
        # Clients with queued jobs, in turn order (dicts keep insertion order).
        self._queues: dict[str, deque[tuple[Callable[[], Any], Future]]] = {}
        self._closed = False
        self._threads = [threading.Thread(target=self._work, name=f"{name}_{i}", daemon=True)
                         for i in range(workers)]
        for thread in self._threads:
            thread.start()

    def submit(self, client: str, fn: Callable[[], Any]) -> Future:
        """Queue fn behind the client's own earlier jobs; RuntimeError once shut down."""
        future: Future = Future()
        with self._cond:
            if self._closed:
                raise RuntimeError("the preparation threads were shut down")
            self._queues.setdefault(client, deque()).append((fn, future))
            self._cond.notify()
        return future

    def queued(self) -> int:
        with self._cond:
            return sum(len(q) for q in self._queues.values())

    def shutdown(self, cancel_futures: bool = True) -> None:
        with self._cond:
            self._closed = True
            if cancel_futures:
                for queue in self._queues.values():
                    for _, future in queue:
                        future.cancel()
                self._queues.clear()
            self._cond.notify_all()

    def _next(self) -> tuple[Callable[[], Any], Future] | None:
        with self._cond:
            while not self._queues:
                if self._closed:
                    return None
                self._cond.wait()
            client = next(iter(self._queues))
            queue = self._queues.pop(client)
            job = queue.popleft()
            if queue:
                self._queues[client] = queue  # back of the line: everyone else goes first
            return job

    def _work(self) -> None:
        while True:
            job = self._next()
            if job is None:
                return
            fn, future = job
            if not future.set_running_or_notify_cancel():  # its client went away
                continue
            try:
                result = fn()
            except BaseException as exc:  # handed to whoever waits for it
                future.set_exception(exc)
            else:
                future.set_result(result)
