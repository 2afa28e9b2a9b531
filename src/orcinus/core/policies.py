"""The scheduling policies by name, and the one factory that builds a scheduler from a name.

The single place that lists the policies: `EngineConfig` validates `scheduler_policy` against
`POLICIES`, and the engine builds its scheduler with `make_scheduler`. Each policy is a
`Scheduler` subclass in its own module (`scheduler.py`: orca, static; `paged_scheduler.py`: paged),
none of which imports this table.
"""
from __future__ import annotations

from orcinus.core.kv_cache import KVCacheManager
from orcinus.core.paged_scheduler import PagedScheduler
from orcinus.core.scheduler import OrcaScheduler, Scheduler, StaticScheduler

# The default, paged, first in the CLI's help; orca is the paper's Algorithm 1, static the
# request-level baseline.
POLICIES: dict[str, type[Scheduler]] = {"orca": OrcaScheduler, "static": StaticScheduler, "paged": PagedScheduler}


def make_scheduler(policy: str, kv_cache: KVCacheManager, max_num_seqs: int, max_model_len: int,
                   max_num_batched_tokens: int | None = None) -> Scheduler:
    if policy not in POLICIES:
        raise ValueError(f"unknown scheduler policy {policy!r}; choose one of {tuple(POLICIES)}")
    return POLICIES[policy](kv_cache, max_num_seqs, max_model_len, max_num_batched_tokens)
