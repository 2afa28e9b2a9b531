"""Prompt preparation takes clients in turn (issue 19, finding 1): a client with a backlog of
big prompts does not make another client's small request wait behind all of it."""
from __future__ import annotations

import threading

import pytest

from orcinus.engine.fair_prepare import FairPreparer


def test_a_small_request_waits_for_one_job_of_a_busy_client_not_its_backlog() -> None:
    pool = FairPreparer(workers=1)
    gate = threading.Event()
    order: list[str] = []

    def job(name: str, block: bool = False):
        def run() -> str:
            if block:
                gate.wait(600)  # liveness only: released below
            order.append(name)
            return name
        return run

    big = [pool.submit("10.0.0.1", job(f"big{i}", block=i == 0)) for i in range(6)]
    small = pool.submit("10.0.0.2", job("small"))
    gate.set()
    assert small.result(timeout=600) == "small"
    assert [f.result(timeout=600) for f in big] == [f"big{i}" for i in range(6)]
    assert order[:2] == ["big0", "small"]  # the busy client's first job, then the other client's
    pool.shutdown()


def test_errors_reach_the_caller_and_shutdown_cancels_what_waits() -> None:
    pool = FairPreparer(workers=1)
    gate, started = threading.Event(), threading.Event()
    first = pool.submit("a", lambda: started.set() or gate.wait(600))
    assert started.wait(600)
    failing = pool.submit("b", lambda: 1 / 0)
    queued = pool.submit("a", lambda: "never")
    pool.shutdown(cancel_futures=True)
    gate.set()
    assert first.result(timeout=600) is True
    assert queued.cancelled() and failing.cancelled()
    with pytest.raises(RuntimeError):
        pool.submit("a", lambda: None)
    pool2 = FairPreparer(workers=1)
    with pytest.raises(ZeroDivisionError):
        pool2.submit("b", lambda: 1 / 0).result(timeout=600)
    pool2.shutdown()
