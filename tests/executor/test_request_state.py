"""Worker-side per-request state: a failed iteration rolls back to exactly the state before it."""
from __future__ import annotations

import pytest
import torch

from orcinus.executor.messages import BatchMessage, CachedRequestData, NewRequestData, SamplingSettings
from orcinus.executor.request_state import RequestStates

CPU = torch.device("cpu")


def test_rollback_restores_tokens_blocks_new_requests_and_generators():
    states = RequestStates(CPU)
    seeded = SamplingSettings(temperature=1.0, seed=7)
    states.apply(BatchMessage(0, [NewRequestData("a", [1, 2], seeded, [0])]))
    a = states.get("a")
    assert a.num_computed_tokens == 0  # its first iteration computes the whole prompt
    gen_before = a.generator.get_state().clone()
    msg = BatchMessage(1, [CachedRequestData("a", 9, [3]), NewRequestData("b", [4], SamplingSettings(), [5])])
    rows, undo = states.apply(msg)
    assert [r.request_id for r in rows] == ["a", "b"]
    assert a.output_token_ids == [9] and a.block_ids == [0, 3] and "b" in states
    assert a.num_computed_tokens == 2  # this iteration computes only the new token
    torch.empty(4).uniform_(generator=a.generator)  # the failed iteration had drawn numbers
    states.rollback(undo)
    assert a.output_token_ids == [] and a.block_ids == [0] and "b" not in states
    assert torch.equal(a.generator.get_state(), gen_before)
    assert a.num_computed_tokens == 0


def test_unknown_cached_request_is_refused_and_nothing_changes():
    states = RequestStates(CPU)
    msg = BatchMessage(0, [NewRequestData("a", [1], SamplingSettings(), [0]), CachedRequestData("ghost", 3)])
    with pytest.raises(KeyError, match="ghost"):
        states.apply(msg)
    assert len(states) == 0


def test_worker_rolls_back_a_message_that_failed_on_another_rank(checkpoint_factory):
    from orcinus.config import EngineConfig
    from orcinus.executor.worker import Worker

    folder, _ = checkpoint_factory("llama")
    worker = Worker(EngineConfig(model=folder, dtype="float32", kv_cache_memory=1 << 20, block_size=4))
    worker.initialize_kv_cache(worker.available_kv_blocks())
    first = worker.execute(BatchMessage(0, [NewRequestData("a", [5, 6, 7], SamplingSettings(temperature=0.0), [0])],
                                        seq=1))
    token = first.token_ids[0]
    again = BatchMessage(1, [CachedRequestData("a", token)], seq=2)
    out = worker.execute(again)
    worker.rollback(2)  # e.g. a later pipeline stage failed message 2
    assert worker.states.get("a").output_token_ids == []
    assert worker.execute(again).token_ids == out.token_ids  # the retry sees the same state
    worker.rollback(1)
    worker.rollback(1)  # twice, or for a message it never applied: nothing happens
    assert "a" not in worker.states
