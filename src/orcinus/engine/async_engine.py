"""AsyncEngine: the LLMEngine's iteration loop on one background thread, for asyncio callers.

The LLMEngine is not thread-safe and `step()` blocks for a whole iteration, so it lives on one
dedicated thread that loops: apply the commands other threads queued (add, abort, call), run one
iteration if there is work, hand every RequestOutput to the asyncio queue of the stream waiting
for it. The event loop only ever takes a short lock to queue a command, so it never blocks on an
iteration, and each request's tokens leave the engine the moment the iteration that made them
ends.

Prompt preparation (chat templates, tokenising) can take a long time for a long prompt (about a
second per megabyte of text), so it runs on a small pool of threads: neither the event loop nor
the iterations of requests already running wait for it, and one long prompt does not hold up the
short ones behind it. The tokenizer's encode and decode only read its state, so those threads
may encode while the engine thread detokenises.

A stream (request_stream.py) keeps only the newest output of each of its requests until its
consumer takes it, so a consumer that stops reading costs one output per request, not one per
iteration.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Sequence

from orcinus.engine.fair_prepare import FairPreparer
from orcinus.engine.llm_engine import EngineStats, LLMEngine, PromptType
from orcinus.engine.request_stream import END, RequestStream
from orcinus.generation_config import GenerationDefaults
from orcinus.errors import EngineStepError, EngineUnavailable, QueueFull, WorkerDied  # noqa: F401  (the last three re-exported)
from orcinus.request import RequestOutput, RequestRejected
from orcinus.sampling_params import SamplingParams

__all__ = ["AsyncEngine", "EngineStepError", "EngineUnavailable", "GenerateRequest", "Health", "QueueFull",
           "RequestStream"]

logger = logging.getLogger(__name__)

# The loop wakes at least this often when idle, so its heartbeat shows it is alive.
_IDLE_WAIT_S = 0.5
# With work that makes no progress, look again this often rather than spin.
_NO_PROGRESS_WAIT_S = 0.05
# This many failed iterations in a row mean the engine is broken, not one bad batch.
_MAX_CONSECUTIVE_STEP_FAILURES = 3
# Threads that prepare prompts: more than one, so that a short prompt never waits for a long
# one; few, so that tokenising never takes the cores the iterations need.
PREPARE_WORKERS = 2


@dataclass
class GenerateRequest:
    request_id: str
    # A callable is run on the prompt-preparation thread and must return the prompt (e.g. it
    # renders a chat template and tokenises the result).
    prompt: PromptType | Callable[[], PromptType]
    params: SamplingParams


@dataclass(frozen=True)
class Health:
    ok: bool
    reason: str = ""


@dataclass
class _Add:
    requests: list[GenerateRequest]
    stream: RequestStream
    accepted: asyncio.Future
    num_seqs: int


@dataclass
class _Abort:
    request_ids: list[str]


@dataclass
class _Call:
    fn: Callable[[LLMEngine], Any]
    loop: asyncio.AbstractEventLoop
    result: asyncio.Future


@dataclass
class _AbortAll:
    reason: str


@dataclass
class _Stop(_AbortAll):
    """Abort everything, then end the loop."""

    reason: str = "the server is shutting down"


@dataclass
class _Counters:
    """What the event loop may read without touching the engine (written by the engine thread)."""

    stats: EngineStats
    heartbeat: float = field(default_factory=time.monotonic)
    busy: bool = False


class AsyncEngine:
    """Drives an LLMEngine from one background thread; all public methods are thread-safe."""

    def __init__(self, engine: LLMEngine, max_waiting_requests: int | None = None,
                 stall_timeout_s: float = 60.0, on_dead: Callable[[str], None] | None = None,
                 prepare_workers: int = PREPARE_WORKERS) -> None:
        """on_dead(reason) is called from the engine thread when the loop ends other than by
        shutdown(): the engine is broken and the process should exit (a supervisor restarts it)."""
        self.engine = engine
        self.max_waiting_requests = max_waiting_requests
        self.stall_timeout_s = stall_timeout_s
        self.on_dead = on_dead
        self._cond = threading.Condition()
        self._inbox: deque[_Add | _Abort | _Call | _AbortAll] = deque()
        self._pending_seqs = 0  # sequences queued in the inbox, not yet in the engine's counts
        self._streams: dict[str, RequestStream] = {}  # engine thread only
        self._counters = _Counters(stats=engine.stats())
        self._thread: threading.Thread | None = None
        # Clients take turns on these threads (fair_prepare.py): one client's big prompts do not
        # make everyone else's small ones wait.
        self._prepare_pool = FairPreparer(prepare_workers)
        self._live_streams: weakref.WeakSet[RequestStream] = weakref.WeakSet()  # event-loop side only
        self._stopping = False
        self._dead_reason: str | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        with self._cond:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._run, name="orcinus-engine", daemon=True)
            self._thread.start()

    async def shutdown(self, timeout_s: float = 30.0) -> None:
        """Abort what is left, stop the loop and wait for the thread to end."""
        with self._cond:
            self._stopping = True
            self._inbox.append(_Stop())
            self._cond.notify()
        self._prepare_pool.shutdown(cancel_futures=True)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, timeout_s)
            if self._thread.is_alive():
                logger.error("the engine thread did not stop within %.0f s", timeout_s)

    # What the server may read of the engine (fixed once it is built): the loop thread owns the rest.
    @property
    def model_path(self) -> str:
        return self.engine.model_path

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.engine.model_config.vocab_size

    @property
    def generation_defaults(self) -> GenerationDefaults:
        return self.engine.generation_defaults

    @property
    def tokenizer(self):
        """The engine's tokenizer (None without one), for the prompt-preparation thread."""
        return self.engine.tokenizer

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._dead_reason is None

    # ------------------------------------------------------------------ observation
    def health(self) -> Health:
        if self._thread is None:
            return Health(False, "the engine loop has not started")
        if self._dead_reason is not None or not self._thread.is_alive():
            # The reason never names requests: /health is unauthenticated.
            return Health(False, f"engine dead: {self._dead_reason or 'the engine thread exited'}")
        if self._stopping:
            return Health(False, "the server is shutting down")
        c = self._counters
        # Progress is an iteration ending or, within one, any layer of any rank completing (the
        # chunks of a long prefill emit no token for minutes but complete layers all along).
        silent = time.monotonic() - max(c.heartbeat, self._executor_progress())
        if silent > self.stall_timeout_s:
            what = "the engine made no progress" if c.busy else "the engine loop has not woken up"
            return Health(False, f"{what} for {silent:.0f} s")
        return Health(True)

    def _executor_progress(self) -> float:
        executor = getattr(self.engine, "executor", None)
        last = executor.last_progress() if executor is not None and hasattr(executor, "last_progress") else None
        return last if last is not None else float("-inf")

    def stats(self) -> EngineStats:
        """The engine's statistics as of the end of its last iteration (or command)."""
        return self._counters.stats

    def num_waiting(self) -> int:
        """Sequences not yet running: waiting in the engine plus queued to it."""
        with self._cond:
            return self._num_waiting_locked()

    def _num_waiting_locked(self) -> int:
        return self._counters.stats.num_waiting + self._pending_seqs

    def num_buffered_outputs(self) -> int:
        """Outputs produced but not yet taken by their consumers, over all live streams (call on
        the event loop). Bounded by the requests in flight, whatever the consumers do."""
        return sum(s.num_buffered for s in list(self._live_streams))

    # ------------------------------------------------------------------ requests
    async def submit(self, requests: Sequence[GenerateRequest], client: str = "") -> RequestStream:
        """Queue requests as one unit and wait until the engine accepted all of them.

        Raises the engine's own validation errors (RequestRejected, SamplingParamsError, or a
        ValueError from a prompt callable) before any output, QueueFull when the sequences
        (prompts x n) would take the waiting queue past its bound, RequestRejected when they
        could never fit in it, EngineUnavailable when the loop is not running. On rejection
        nothing stays queued. Cancelling the caller while prompts are still being prepared
        drops its preparation if it has not started. Prompts are prepared one job each, in
        turn with other clients' (`client` names who asks: the server uses the peer address).
        """
        loop = asyncio.get_running_loop()
        reqs = list(requests)
        num_seqs = sum(r.params.n for r in reqs)
        with self._cond:
            self._check_admission(num_seqs)  # refuse at once, before any tokenizer work
        if any(callable(r.prompt) or r.params.structured_outputs is not None for r in reqs):
            # Prompts and grammars are prepared off the engine loop, in turn with other clients'
            # work; the engine then finds each grammar compiled in its cache.
            reqs = await self._prepare_each(reqs, client)
        stream = RequestStream([r.request_id for r in reqs], loop, abort=self.abort, forget=self._live_streams.discard)
        cmd = _Add(reqs, stream, loop.create_future(), num_seqs)
        with self._cond:
            self._check_admission(num_seqs)
            self._pending_seqs += cmd.num_seqs
            self._inbox.append(cmd)
            self._cond.notify()
        try:
            await cmd.accepted
        except asyncio.CancelledError:
            stream.close()  # the caller went away before the engine answered
            raise
        self._live_streams.add(stream)
        return stream

    async def generate(self, request_id: str, prompt: PromptType | Callable[[], PromptType],
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """One request's outputs as they are produced; closing the iterator early aborts it."""
        stream = await self.submit([GenerateRequest(request_id, prompt, params)])
        try:
            async for out in stream:
                yield out
        finally:
            stream.close()

    def abort_all(self, reason: str) -> None:
        """Abort every request; their consumers get EngineUnavailable(reason). The loop goes on."""
        with self._cond:
            self._inbox.append(_AbortAll(reason))
            self._cond.notify()

    def abort(self, request_ids: Sequence[str]) -> None:
        """Abort requests (unknown or finished ids are ignored); takes effect before the next iteration."""
        with self._cond:
            self._inbox.append(_Abort(list(request_ids)))
            self._cond.notify()

    async def call(self, fn: Callable[[LLMEngine], Any]) -> Any:
        """Run fn(engine) on the engine thread between iterations."""
        loop = asyncio.get_running_loop()
        cmd = _Call(fn, loop, loop.create_future())
        with self._cond:
            self._check_accepting()
            self._inbox.append(cmd)
            self._cond.notify()
        return await cmd.result

    async def prepare(self, fn: Callable[[], Any], client: str = "") -> Any:
        """Run fn on a prompt-preparation thread (tokenizer work that must not hold up anyone),
        in turn with other clients' jobs."""
        try:
            future = asyncio.wrap_future(self._prepare_pool.submit(client, fn))
        except RuntimeError as exc:  # the pool was shut down: we are stopping
            raise EngineUnavailable("the server is shutting down") from exc
        return await future

    async def _prepare_each(self, reqs: list[GenerateRequest], client: str) -> list[GenerateRequest]:
        """Each request's preparation (its prompt, its grammar) as a job of its own; the first
        failure cancels the rest."""
        structured = self.engine.structured
        jobs = {i: asyncio.ensure_future(self.prepare(lambda r=r: _prepare_one(r, structured), client))
                for i, r in enumerate(reqs) if callable(r.prompt) or r.params.structured_outputs is not None}
        try:
            prepared = dict(zip(jobs, await asyncio.gather(*jobs.values())))
        except BaseException:
            for job in jobs.values():
                job.cancel()
            raise
        return [prepared.get(i, r) for i, r in enumerate(reqs)]

    def _check_accepting(self) -> None:
        if self._dead_reason is not None or self._thread is None or not self._thread.is_alive():
            raise EngineUnavailable(f"the engine is not running ({self._dead_reason or 'not started'})")
        if self._stopping:
            raise EngineUnavailable("the server is shutting down")

    def _check_admission(self, num_seqs: int = 1) -> None:
        self._check_accepting()
        c = self._counters
        if c.busy and time.monotonic() - max(c.heartbeat, self._executor_progress()) > self.stall_timeout_s:
            # Stalled (a stopped worker, say): taking more work would only add clients that hang
            # until the executor gives up on the worker.
            raise EngineUnavailable("the engine is making no progress; retry later or on another instance")
        bound = self.max_waiting_requests
        if bound is None:
            return
        if num_seqs > bound:  # could never be queued: the client's to change, not to retry
            raise RequestRejected(f"this request holds {num_seqs} sequences (prompts x n) but at most {bound} "
                                  "may wait in this server; send fewer prompts or a smaller n", "n")
        if self._num_waiting_locked() + num_seqs > bound:
            raise QueueFull(f"the server is at its bound of {bound} waiting sequences; retry later")

    # ------------------------------------------------------------------ the engine thread
    def _run(self) -> None:
        reason = "the engine loop exited"
        try:
            reason = self._loop_until_stopped()
        except BaseException as exc:  # a bug here must still release every waiting caller
            logger.critical("the engine loop died", exc_info=True)
            reason = f"the engine loop died ({type(exc).__name__})"
        finally:
            with self._cond:
                self._dead_reason = reason
                stopped_on_request = self._stopping
            error = EngineUnavailable(reason)
            self._fail_all(error)
            self._fail_inbox(error)
            with contextlib.suppress(Exception):  # the engine may be beyond reading
                self._publish(adds=0)
            if not stopped_on_request:
                logger.critical("the engine is dead: %s", reason)
                if self.on_dead is not None:
                    self.on_dead(reason)

    def _loop_until_stopped(self) -> str:
        """The iteration loop; returns why it stopped."""
        failures = 0
        while True:
            stop = self._apply(self._wait_for_work())
            if stop is not None:
                self._drain()
                return stop.reason
            if not self.engine.has_unfinished_requests():
                continue
            try:
                outputs = self.engine.step()
            except EngineStepError as exc:
                # Only these requests failed (the engine isolated them); the rest go on. When every
                # request of a batch failed alone, the device or model is at fault: repeated, fatal.
                self._fail_requests(exc)
                # A lone request failing says nothing either way: the count stays.
                if exc.whole_batch:
                    failures += 1
                if failures >= _MAX_CONSECUTIVE_STEP_FAILURES:
                    return f"{failures} iterations failed in a row ({type(exc.cause).__name__})"
                continue
            except WorkerDied as exc:  # nothing can run any more: stop now (health turns 503)
                # The detail (ranks, pids, exit codes) is for the log; clients and /health get
                # what happened, not how the host's processes are laid out.
                logger.critical("a worker failed: %s", exc)
                return "a worker process failed or stopped answering; the server must be restarted"
            except Exception as exc:
                # The engine aborted the failed batch; its state is suspect, so fail every
                # request (their clients get an error, not a hang) but keep serving: one bad
                # iteration must not take the server down. Repeated failures do.
                failures += 1
                logger.exception("an engine iteration failed (%d in a row)", failures)
                # The engine's message names every request of the batch (and a cause's message
                # may too): clients get the kind of failure only, the log has the rest.
                cause = getattr(exc, "cause", exc)
                self._fail_all(EngineStepError(
                    f"the engine failed while running this request ({type(cause).__name__}); see the server log"))
                if failures >= _MAX_CONSECUTIVE_STEP_FAILURES:
                    return f"{failures} iterations failed in a row ({type(cause).__name__})"
                continue
            failures = 0
            # Publish before delivering: a client that has seen its request finish must find it
            # gone from the counts (a sequential client would otherwise hit the queue bound).
            self._publish(adds=0, progressed=bool(outputs))
            self._deliver(outputs)
            if not outputs:
                # Work the engine will not run: do not spin on it; /health reports the stall.
                with self._cond:
                    self._cond.wait(_NO_PROGRESS_WAIT_S)

    def _drain(self) -> None:
        """At shutdown, after aborting everything: let batches still in flight come back so that
        every KV block is returned, then say if any leaked."""
        for _ in range(self.engine.config.n_workers + 1):
            if not self.engine.has_unfinished_requests():
                break
            self.engine.step()
        if not self.engine.free_all_check():
            logger.warning("KV blocks are still allocated after shutdown")

    def _wait_for_work(self) -> list:
        with self._cond:
            while not self._inbox and not self.engine.has_unfinished_requests():
                self._counters.heartbeat = time.monotonic()
                self._counters.busy = False
                self._cond.wait(_IDLE_WAIT_S)
            self._counters.busy = True
            commands = list(self._inbox)
            self._inbox.clear()
            return commands

    def _apply(self, commands: list) -> _Stop | None:
        added = 0
        stop = None
        for cmd in commands:
            if isinstance(cmd, _Add):
                self._add(cmd)
                added += cmd.num_seqs
            elif isinstance(cmd, _Abort):
                for rid in cmd.request_ids:
                    self._streams.pop(rid, None)
                    self.engine.abort_request(rid)
            elif isinstance(cmd, _Call):
                try:
                    _resolve(cmd.loop, cmd.result, value=cmd.fn(self.engine))
                except Exception as exc:
                    _resolve(cmd.loop, cmd.result, error=exc)
            elif isinstance(cmd, _AbortAll):
                self._fail_all(EngineUnavailable(cmd.reason))
                if isinstance(cmd, _Stop):
                    stop = cmd
        if commands:
            self._publish(adds=added)
        return stop

    def _add(self, cmd: _Add) -> None:
        added: list[str] = []
        try:
            for req in cmd.requests:
                self.engine.add_request(req.request_id, req.prompt, req.params)
                added.append(req.request_id)
        except Exception as exc:
            for rid in added:  # all or nothing: a rejected batch leaves nothing behind
                self.engine.abort_request(rid)
            _resolve(cmd.stream.loop, cmd.accepted, error=exc)
            return
        for rid in added:
            self._streams[rid] = cmd.stream
        if not _resolve(cmd.stream.loop, cmd.accepted, value=None):
            self._abort_now(added)  # the caller's loop is gone; nobody will read these

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            if out.finished:
                del self._streams[out.request_id]
            if not _call_soon(stream.loop, stream._push, out):
                self._abort_now([rid for rid, s in self._streams.items() if s is stream])
                continue
            if out.finished and not any(s is stream for s in self._streams.values()):
                _call_soon(stream.loop, stream._push, END)

    def _abort_now(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self._streams.pop(rid, None)
            self.engine.abort_request(rid)

    def _fail_requests(self, exc: EngineStepError) -> None:
        """Fail the streams of the requests the engine aborted, each told only about its own."""
        for rid in exc.request_ids:
            stream = self._streams.get(rid)
            if stream is not None:
                _call_soon(stream.loop, stream._push, EngineStepError(exc.message_for(rid)))
                self._abort_now([r for r, s in self._streams.items() if s is stream])

    def _fail_all(self, error: BaseException) -> None:
        """Hand the error to every consumer, then abort their requests (if the engine lets us:
        consumers must be released even when it is broken)."""
        streams = {id(s): s for s in self._streams.values()}
        for stream in streams.values():
            _call_soon(stream.loop, stream._push, error)
        try:
            self._abort_now(list(self._streams))
        except Exception:
            logger.exception("aborting requests after a failure failed too")
            self._streams.clear()

    def _fail_inbox(self, error: BaseException) -> None:
        with self._cond:
            commands = list(self._inbox)
            self._inbox.clear()
            self._pending_seqs = 0
        for cmd in commands:
            if isinstance(cmd, _Add):
                _resolve(cmd.stream.loop, cmd.accepted, error=error)
            elif isinstance(cmd, _Call):
                _resolve(cmd.loop, cmd.result, error=error)

    def _publish(self, adds: int, progressed: bool = False) -> None:
        """Refresh what other threads read; inbox adds leave the pending count only now, so that
        waiting requests are never under-counted in between. The heartbeat moves only when an
        iteration produced something or completed (a prefill chunk emits nothing but is progress),
        or in idle waits: a loop that turns without progress is as stuck as one that does not turn."""
        stats = self.engine.stats()
        with self._cond:
            if stats.iterations_total != self._counters.stats.iterations_total:
                progressed = True
            self._counters.stats = stats
            if progressed:
                self._counters.heartbeat = time.monotonic()
            self._pending_seqs = max(0, self._pending_seqs - adds)


def _prepare_one(r: GenerateRequest, structured=None) -> GenerateRequest:
    if structured is not None and r.params.structured_outputs is not None:
        structured.compile(r.params.structured_outputs)  # raises GrammarError: a 400
    return dataclasses.replace(r, prompt=r.prompt()) if callable(r.prompt) else r


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable, *args: Any) -> bool:
    """Schedule fn on loop from another thread; False when that loop is closed."""
    try:
        loop.call_soon_threadsafe(fn, *args)
        return True
    except RuntimeError:
        return False


def _resolve(loop: asyncio.AbstractEventLoop, fut: asyncio.Future, value: Any = None,
             error: BaseException | None = None) -> bool:
    def settle() -> None:
        if fut.done():  # cancelled by a caller that went away
            return
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(value)

    return _call_soon(loop, settle)
