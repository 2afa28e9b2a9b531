"""The executor for a configuration: one worker in this process, or one spawned process per rank."""
from __future__ import annotations

from orcinus.config import EngineConfig
from orcinus.executor.executor import Executor


def runs_in_process(config: EngineConfig) -> bool:
    """Whether the engine's one worker lives in this process (no tensor or pipeline parallelism)."""
    return not (config.tensor_parallel_size > 1 or config.pipeline_parallel_size > 1 or config.nnodes > 1)


def make_executor(config: EngineConfig) -> Executor:
    """Built where the caller is; an in-process executor then loads its model on its own thread."""
    if not runs_in_process(config):
        from orcinus.executor.multiproc import MultiprocExecutor

        return MultiprocExecutor(config)
    from orcinus.executor.uniproc import SingleProcessExecutor

    return SingleProcessExecutor(config)
