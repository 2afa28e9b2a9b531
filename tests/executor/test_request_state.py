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
