"""Executors own the workers: they load the model on every rank, size the KV pool (the minimum
over ranks), and run iterations. The interface is asynchronous so that up to `n_workers` batches
can be in flight (Orca's pipeline: a stage forwards the control message and starts the next batch
without waiting for the last stage). The engine talks to an executor in `BatchMessage`s only."""
from __future__ import annotations

from abc import ABC, abstractmethod
from concurrent.futures import Future

from orcinus.config import EngineConfig, ModelConfig
from orcinus.executor.messages import BatchMessage
from orcinus.sampler import SamplerOutput


class WorkerDied(RuntimeError):
    """A worker process exited or failed beyond recovery; the executor cannot run batches."""


class Executor(ABC):
    model_config: ModelConfig
    model_path: str
    num_blocks: int  # KV blocks every rank holds; the engine's block manager hands out these ids

    @abstractmethod
    def execute_async(self, msg: BatchMessage) -> "Future[SamplerOutput]":
        """Launch one iteration; the future resolves to the sampled tokens, one per row."""

    def shutdown(self) -> None:
        """Release workers; idempotent."""

    def last_progress(self) -> float | None:
        """time.monotonic() of the newest completed layer on any rank (progress.py), or None."""
        return None


class SingleProcessExecutor(Executor):
    """One worker in this process; runs the iteration at launch, the future is already resolved."""

    def __init__(self, config: EngineConfig) -> None:
        from orcinus.executor.worker import Worker

        from orcinus.executor.progress import Progress, watch_layers

        self.driver_worker = Worker(config)
        self.progress = Progress(1)
        watch_layers(self.driver_worker.runner.model, self.progress.beater())
        self.model_config = self.driver_worker.model_config
        self.model_path = self.driver_worker.model_path
        self.num_blocks = min(w.available_kv_blocks() for w in self.workers)
        for w in self.workers:
            w.initialize_kv_cache(self.num_blocks)

    @property
    def workers(self) -> list:
        return [self.driver_worker]

    def last_progress(self) -> float | None:
        return self.progress.latest()

    def execute_async(self, msg: BatchMessage) -> "Future[SamplerOutput]":
        fut: Future[SamplerOutput] = Future()
        try:
            fut.set_result(self.driver_worker.execute(msg))
            self.progress.beat()
        except BaseException as exc:  # surfaced to the engine when it waits on the batch
            fut.set_exception(exc)
        return fut


def runs_in_process(config: EngineConfig) -> bool:
    """Whether the engine's one worker lives in this process (no tensor or pipeline parallelism)."""
    return not (config.tensor_parallel_size > 1 or config.pipeline_parallel_size > 1 or config.nnodes > 1)


def make_executor(config: EngineConfig) -> Executor:
    """One process, or one spawned worker process per rank (tensor x pipeline parallel)."""
    if not runs_in_process(config):
        from orcinus.executor.multiproc import MultiprocExecutor

        return MultiprocExecutor(config)
    return SingleProcessExecutor(config)
