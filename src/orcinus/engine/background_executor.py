"""Runs an in-process executor's iterations on one background thread.

`SingleProcessExecutor.execute_async` computes the whole iteration before it returns, so the
engine could not do anything while the model runs. Behind this wrapper the call returns at once
and the iteration runs on the `orcinus-forward` thread; the engine thread meanwhile turns the
previous iteration's tokens into text (torch releases the GIL inside its kernels, and on CUDA the
thread mostly waits for the device). One thread runs the messages one at a time, in the order
they were sent, as the worker requires. Executors whose workers run elsewhere (other processes,
other machines) are already asynchronous and are used as they are.

An in-process executor is also *built* on that thread (`start_executor`): loading the model, sizing
and allocating the KV pool and every forward then run on one thread, so the process has one
OpenMP thread team. With the model loaded on the caller's thread and iterations run on this one
there were two teams; libgomp then counts more threads than cores and stops spinning between
parallel regions, and every region paid a wake-up. On two cores of an Intel Xeon a 64-request
float32 decode step took 186-196 ms that way against 146-150 ms with one team, and the prompt
step 9.0-9.3 s against 8.4 s (docs/benchmarks.md, "Fourth round").
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

from orcinus.config import EngineConfig
from orcinus.executor.executor import Executor, SingleProcessExecutor, make_executor, runs_in_process
from orcinus.executor.messages import BatchMessage
from orcinus.sampler import SamplerOutput


def _run(executor: Executor, msg: BatchMessage) -> SamplerOutput:
    return executor.execute_async(msg).result()


def _forward_thread() -> ThreadPoolExecutor:
    # The pool's thread exits when the pool is garbage-collected or shut down.
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="orcinus-forward")


def start_executor(config: EngineConfig) -> "BackgroundLauncher":
    """The engine's executor behind its launcher; an in-process one is built on the forward thread."""
    if not runs_in_process(config):
        return BackgroundLauncher(make_executor(config))
    pool = _forward_thread()
    try:
        executor = pool.submit(make_executor, config).result()
    except BaseException:
        pool.shutdown(wait=False)
        raise
    return BackgroundLauncher(executor, pool)


class BackgroundLauncher:
    def __init__(self, executor: Executor, pool: ThreadPoolExecutor | None = None) -> None:
        self.executor = executor
        self._pool = (pool or _forward_thread()) if isinstance(executor, SingleProcessExecutor) else None

    def execute_async(self, msg: BatchMessage) -> "Future[SamplerOutput]":
        if self._pool is None:
            return self.executor.execute_async(msg)
        # Exceptions, KeyboardInterrupt included, come back through the future.
        return self._pool.submit(_run, self.executor, msg)

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
