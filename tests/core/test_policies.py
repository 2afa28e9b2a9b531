"""The policy table (`orcinus/core/policies.py`): the one place that names the policies, which the
settings validate against and the engine builds from."""
from __future__ import annotations

import typing

import pytest

from orcinus.config import EngineConfig
from orcinus.core.kv_cache import KVCacheManager
from orcinus.core.paged_scheduler import PagedScheduler
from orcinus.core.policies import POLICIES, make_scheduler
from orcinus.core.scheduler import OrcaScheduler, StaticScheduler
from orcinus.errors import ConfigError


def test_each_name_builds_its_policy():
    assert POLICIES == {"orca": OrcaScheduler, "static": StaticScheduler, "paged": PagedScheduler}
    for name, cls in POLICIES.items():
        sched = make_scheduler(name, KVCacheManager(8, 4), 3, 100, 7)
        assert type(sched) is cls
        assert (sched.max_num_seqs, sched.max_model_len, sched.max_num_batched_tokens) == (3, 100, 7)
    with pytest.raises(ValueError, match="unknown scheduler policy 'fifo'"):
        make_scheduler("fifo", KVCacheManager(8, 4), 3, 100)


def test_the_settings_offer_exactly_the_table():
    # The CLI's choices come from the field's Literal; it must list the table's names, no more.
    hint = typing.get_type_hints(EngineConfig)["scheduler_policy"]
    assert set(typing.get_args(hint)) == set(POLICIES)
    with pytest.raises(ConfigError, match="scheduler_policy='fifo' is unknown"):
        EngineConfig(scheduler_policy="fifo")
