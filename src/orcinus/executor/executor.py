"""Executors own the workers: they load the model on every rank, size the KV pool (the minimum
over ranks), and run iterations. The interface is asynchronous so that up to `n_workers` batches
can be in flight (Orca's pipeline: a stage forwards the control message and starts the next batch
without waiting for the last stage). The engine talks to an executor in `BatchMessage`s only, and
learns what the workers resolved (device, dtype, CUDA graphs, the model's path and shape) from
their ready reply, `WorkerInfo`.

The implementations: `uniproc.py` (one worker in this process, on a thread of its own),
`multiproc.py` (one spawned process per rank); `factory.py` picks one."""
from __future__ import annotations

from abc import ABC, abstractmethod
from concurrent.futures import Future

from orcinus.config import ModelConfig
from orcinus.errors import WorkerDied  # noqa: F401  (re-exported: raised by executors)
from orcinus.executor.messages import BatchMessage, SamplerOutput, WorkerInfo


class Executor(ABC):
    info: WorkerInfo  # what the first rank reported when it was ready
    num_blocks: int  # KV blocks every rank holds; the engine's block manager hands out these ids

    @property
    def model_config(self) -> ModelConfig:
        return self.info.model_config

    @property
    def model_path(self) -> str:
        return self.info.model_path

    @abstractmethod
    def execute_async(self, msg: BatchMessage) -> "Future[SamplerOutput]":
        """Launch one iteration; the future resolves to the sampled tokens, one per row."""

    def shutdown(self) -> None:
        """Release workers; idempotent."""
