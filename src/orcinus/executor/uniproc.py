"""One worker in this process, driven from a thread of its own: `SingleProcessExecutor`.

A worker computes a whole iteration before `Worker.execute` returns, so an executor that called it
on the engine's thread would leave the engine idle while the model runs. This executor is
asynchronous by itself: `execute_async` hands the message to the `orcinus-forward` thread and
returns at once; the engine thread meanwhile turns the previous iteration's tokens into text
(torch releases the GIL inside its kernels, and on CUDA the thread mostly waits for the device).
One thread runs the messages one at a time, in the order they were sent, as the worker requires.

The worker is also *built* on that thread: loading the model, sizing and allocating the KV pool and
every forward then run on one thread, so the process has one OpenMP thread team. With the model
loaded on the caller's thread and iterations run on this one there were two teams; libgomp then
counts more threads than cores and stops spinning between parallel regions, and every region paid
a wake-up. On two cores of an Intel Xeon a 64-request float32 decode step took 186-196 ms that way
against 146-150 ms with one team, and the prompt step 9.0-9.3 s against 8.4 s
(docs/benchmarks.md, "Fourth round").
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

from orcinus.config import EngineConfig
from orcinus.executor.executor import Executor
from orcinus.executor.messages import BatchMessage, SamplerOutput
from orcinus.executor.thread_governor import governor_for


class SingleProcessExecutor(Executor):
    def __init__(self, config: EngineConfig) -> None:
        # The pool's thread exits when the pool is shut down (or garbage-collected).
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="orcinus-forward")
        try:
            self._pool.submit(self._start, config).result()
        except BaseException:
            self._pool.shutdown(wait=False)
            raise

    def _start(self, config: EngineConfig) -> None:  # on the forward thread
        from orcinus.executor.worker import Worker

        from orcinus.executor.progress import Progress, watch_layers

        self.driver_worker = Worker(config)
        # cpu_thread_policy=auto: the team follows what other processes leave free (thread_governor.py).
        self.governor = governor_for(self.driver_worker.device.type, config.cpu_thread_policy)
        # Liveness follows every finished layer, not only finished iterations (progress.py).
        self.progress = Progress(1)
        watch_layers(self.driver_worker.runner.model, self.progress.beater())
        self.info = self.driver_worker.ready_info()
        self.num_blocks = self.info.num_blocks
        self.driver_worker.initialize_kv_cache(self.num_blocks)

    def execute_async(self, msg: BatchMessage) -> "Future[SamplerOutput]":
        # Exceptions, KeyboardInterrupt included, come back through the future.
        return self._pool.submit(self._execute, msg)

    def _execute(self, msg: BatchMessage) -> SamplerOutput | None:  # on the forward thread
        # The worker is looked up when the message runs, not when it was queued (tests swap
        # `driver_worker.execute` between steps while the next iteration is already queued).
        if self.governor is not None:
            self.governor.tick()
        out = self.driver_worker.execute(msg)
        self.progress.beat()
        return out

    def last_progress(self) -> float | None:
        return self.progress.latest()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)
