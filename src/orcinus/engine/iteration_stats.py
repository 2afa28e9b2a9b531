"""What the engine tells observers about each iteration, so that tools outside it (the benchmarks'
KV recorder, a metrics exporter) read it instead of wrapping the engine's methods.

`LLMEngine.add_observer(fn)`: after every `step()` that returns, `fn(IterationStats)` is called on
the engine's thread with the batches launched during that step and the engine's counters after
it. With no observer the engine computes none of this.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


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


@dataclass
class IterationStats:
    """One `step()`: the batches it launched (a step may launch two: the engine starts the next
    iteration before it returns) and the engine's counters after it."""

    launched: list[LaunchedBatch]
    stats: EngineStats


IterationObserver = Callable[[IterationStats], None]
