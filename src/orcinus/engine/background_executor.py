"""Runs an in-process executor's iterations on one background thread.

`SingleProcessExecutor.execute_async` computes the whole iteration before it returns, so the
engine could not do anything while the model runs. Behind this wrapper the call returns at once
and the iteration runs on the `orcinus-forward` thread; the engine thread meanwhile turns the
previous iteration's tokens into text (torch releases the GIL inside its kernels, and on CUDA the
thread mostly waits for the device). One thread runs the messages one at a time, in the order
they were sent, as the worker requires. Executors whose workers run elsewhere (other processes,
other machines) are already asynchronous and are used as they are.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

from orcinus.executor.executor import Executor, SingleProcessExecutor
from orcinus.executor.messages import BatchMessage
from orcinus.sampler import SamplerOutput


def _run(executor: Executor, msg: BatchMessage) -> SamplerOutput:
    return executor.execute_async(msg).result()


class BackgroundLauncher:
    def __init__(self, executor: Executor) -> None:
        self.executor = executor
        # The pool's thread exits when the pool is garbage-collected or shut down.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="orcinus-forward") \
            if isinstance(executor, SingleProcessExecutor) else None

    def execute_async(self, msg: BatchMessage) -> "Future[SamplerOutput]":
        if self._pool is None:
            return self.executor.execute_async(msg)
        # Exceptions, KeyboardInterrupt included, come back through the future.
        return self._pool.submit(_run, self.executor, msg)

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
