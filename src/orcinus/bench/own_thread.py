"""`on_own_thread(fn, ...)`: run a measurement on a thread that ends with it.

torch's OpenMP keeps a thread team for every thread that ran parallel work, for as long as that
thread lives. A team left behind (transformers or a peak-rate matmul on the main thread, say)
makes libgomp count more threads than cores while the engine's forward thread runs its own team,
and then it stops spinning between parallel regions: every region pays a wake-up. On two cores
that cost orcinus ~20 % of a decode step (orcinus/executor/uniproc.py; docs/benchmarks.md,
"Validation, 2026-12-05"). `bench offline` runs each backend this way, and `bench calibrate` its
peak-rate measurement and its iterations, so each measures the engine as it runs alone.
"""
from __future__ import annotations

import threading
from typing import Callable, TypeVar

T = TypeVar("T")


def on_own_thread(fn: Callable[..., T], *args, name: str = "orcinus-bench-backend", **kwargs) -> T:
    """fn(*args, **kwargs) on a new thread, joined before this returns; its result or its
    exception, as a call would give."""
    box: dict[str, object] = {}

    def target() -> None:
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # handed to the caller below
            box["error"] = exc

    # A daemon thread rather than a ThreadPoolExecutor: Ctrl-C in join() then ends the bench at
    # once instead of waiting, at interpreter exit, for the run to finish.
    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]
