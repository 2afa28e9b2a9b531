"""Executors run iterations. One process today; the interface is asynchronous so that up to
`n_workers` batches can be in flight (Orca's pipeline: a stage forwards the control message
and starts the next batch without waiting for the last stage)."""
from __future__ import annotations

from abc import ABC, abstractmethod
from concurrent.futures import Future

from orcinus.executor.model_runner import ModelRunner
from orcinus.request import Request
from orcinus.sampler import SamplerOutput


class Executor(ABC):
    @abstractmethod
    def execute_async(self, requests: list[Request], num_new_tokens: list[int],
                      block_tables: list[list[int]]) -> "Future[SamplerOutput]":
        """Launch one iteration; the future resolves to the sampled tokens."""


class SingleProcessExecutor(Executor):
    """Runs the iteration at launch time in this process; the future is already resolved."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner

    def execute_async(self, requests, num_new_tokens, block_tables):
        fut: Future[SamplerOutput] = Future()
        try:
            fut.set_result(self.runner.execute(requests, num_new_tokens, block_tables))
        except BaseException as exc:  # surfaced to the engine when it waits on the batch
            fut.set_exception(exc)
        return fut
