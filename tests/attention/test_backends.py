"""Every CPU backend against the reference backend on mixed batches (prefill chunks + decodes, GQA,
sliding windows, contexts ending mid-block, shuffled block tables), and the backend factory."""
from __future__ import annotations

import pytest
import torch

from attention_cases import CASES, assert_matches_reference
from orcinus.attention.batched import BatchedAttention
from orcinus.attention.selector import auto_backend_name, make_backend


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_batched_matches_reference(case):
    assert_matches_reference(BatchedAttention(), case)


@pytest.mark.parametrize("seed", [1, 2])
def test_batched_matches_reference_on_other_data(seed):
    assert_matches_reference(BatchedAttention(), CASES[0], seed=seed)


def test_auto_picks_batched_on_cpu_and_never_reference():
    assert auto_backend_name(torch.device("cpu")) == "batched"
    assert make_backend("auto", torch.device("cpu")).name == "batched"
    assert make_backend("reference", torch.device("cpu")).name == "reference"


def test_unknown_backend_name_says_what_to_choose():
    with pytest.raises(ValueError, match="choose one of"):
        make_backend("flash", torch.device("cpu"))
