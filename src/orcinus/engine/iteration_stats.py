"""What the engine tells observers about each iteration, so that tools outside it (the benchmarks'
KV recorder, a metrics exporter) read it instead of wrapping the engine's methods.

`LLMEngine.add_observer(fn)`: after every `step()` that returns, `fn(IterationStats)` is called on
the engine's thread with the batches launched during that step and the engine's counters after
it. With no observer the engine computes none of this.

`add_observer(fn, phases=True)`: the step's phases are timed too (`IterationStats.phases`,
`StepPhases`): the engine thread's with `time.perf_counter()`, and the worker's, which it reports
in its reply when the batch message asks (`BatchMessage.timed`, `SamplerOutput.phases`). Only
while such an observer is registered does the engine read a clock for them.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from orcinus.executor.messages import WorkerPhases


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_free_blocks: int
    num_blocks: int
    prompt_tokens_total: int
    generation_tokens_total: int
    iterations_total: int
    last_step_time: float = field(default=0.0)
    num_preemptions_total: int = 0
    prefix_cache_queries_total: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits_total: int = 0  # of those, tokens whose KV was found cached
    kv_real_token_slots: int = 0  # KV slots holding a computed token (a shared block counted once)
    kv_allocated_slots: int = 0  # KV slots in blocks some request holds (reserved or filled)


@dataclass
class LaunchedBatch:
    """One batch as the scheduler chose it, counted before it runs."""

    num_requests: int
    num_tokens: int  # positions the model computes: prompts (or chunks), decodes, recomputation
    num_prompt_tokens: int  # of those, prompt positions (a cached prefix is not computed again)
    # what its cost depends on (the simulator's calibration reads these, sim/cost_model.BatchShape):
    num_sampled: int = 0  # rows that sample a token (a prompt chunk short of the end does not)
    keys_seen: float = 0.0  # sum over computed positions of the keys each attends to (causal)
    kv_tokens: int = 0  # sum over rows of context + new tokens


@dataclass
class StepPhases:
    """Where one `step()`'s time went. `seconds`/`calls`: the engine thread's phases ("scheduling":
    the scheduler and the batch message; "output tokens and stops"; "output processing
    (detokenisation)"; "waiting for the iteration"); `step_s`: the whole step; `worker`: the
    forward thread's phases of each iteration this step collected."""

    seconds: dict[str, float] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    step_s: float = 0.0
    worker: list[WorkerPhases] = field(default_factory=list)

    def add(self, phase: str, since: float) -> None:
        """Count the time from `since` (a `time.perf_counter()` value) to now in `phase`."""
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - since
        self.calls[phase] = self.calls.get(phase, 0) + 1


@dataclass
class IterationStats:
    """One `step()`: the batches it launched (a step may launch two: the engine starts the next
    iteration before it returns) and the engine's counters after it."""

    launched: list[LaunchedBatch]
    stats: EngineStats
    phases: StepPhases | None = None  # when an observer asked for them


IterationObserver = Callable[[IterationStats], None]
