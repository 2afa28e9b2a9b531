"""SamplingParams.validate: every number is refused unless the engine can represent it (int32
tensors for top_k and token ids, 64-bit generators for seeds, float32 for probabilities and
penalties), with a message naming the parameter."""
from __future__ import annotations

import pytest

from orcinus.sampling_params import MIN_TOP_P, SamplingParams, SamplingParamsError


@pytest.mark.parametrize("field, value", [
    ("top_k", 9223372036854775808), ("top_k", 2**31), ("top_k", -2), ("top_k", 1.5),
    ("seed", 2**64), ("seed", -(2**63) - 1), ("n", 0), ("n", True),
    ("max_tokens", 0), ("max_tokens", 2**31), ("min_tokens", -1), ("min_tokens", 2**31),
    ("logprobs", 21), ("logprobs", -1),
    ("top_p", 0.0), ("top_p", 1.5), ("top_p", float("nan")), ("min_p", 1.01),
    ("repetition_penalty", 1e-50), ("repetition_penalty", 0.0), ("repetition_penalty", 101.0),
    ("presence_penalty", 2.5), ("frequency_penalty", float("inf")), ("temperature", -1.0),
    ("stop_token_ids", [-1]), ("stop_token_ids", [2**31]), ("stop", [3]),
])
def test_unrepresentable_values_are_refused(field: str, value: object) -> None:
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(**{field: value})
    assert info.value.param == field and field in str(info.value)


def test_boundary_values_are_accepted() -> None:
    p = SamplingParams(top_k=2**31 - 1, seed=-(2**63), max_tokens=2**31 - 1, logprobs=20,
                       repetition_penalty=0.01, stop_token_ids=[0, 2**31 - 1])
    assert p.top_k == 2**31 - 1
    assert SamplingParams(top_k=0).top_k == -1  # 0 means off, as -1


def test_a_tiny_top_p_survives_float32() -> None:
    """1e-50 is 0 in float32, where p = 0 masks every token; it is raised to the smallest value
    that keeps its meaning (only the most likely token)."""
    import torch

    p = SamplingParams(top_p=1e-50)
    assert p.top_p == MIN_TOP_P and torch.tensor(p.top_p, dtype=torch.float32).item() > 0
    assert torch.tensor(p.top_p, dtype=torch.bfloat16).item() > 0
    assert SamplingParams(top_p=0.5).top_p == 0.5
