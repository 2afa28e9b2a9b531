"""Every CPU backend against the reference backend on mixed batches (prefill chunks + decodes, GQA,
sliding windows, contexts ending mid-block, shuffled block tables), and the backend factory."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from attention_cases import CASES, assert_matches_reference, make_inputs
from orcinus.attention.batched import BatchedAttention
from orcinus.attention.paged_cpu import PagedCpuAttention
from orcinus.attention.selector import auto_backend_name, make_backend


BACKENDS = {"batched": BatchedAttention, "paged": PagedCpuAttention}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_backend_matches_reference(backend, case):
    assert_matches_reference(BACKENDS[backend](), case)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", [1, 2])
def test_backend_matches_reference_on_other_data(backend, seed):
    assert_matches_reference(BACKENDS[backend](), CASES[0], seed=seed)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_paged_reads_consecutive_blocks_in_place(case):
    """With every request's blocks consecutive, the paged backend reads views of the pool (no
    block ids uploaded) and still matches the reference."""
    layout = make_inputs(case, consecutive=True)[0]
    meta = PagedCpuAttention().build(layout, lambda a: torch.from_numpy(np.ascontiguousarray(a)))
    assert all(r.ids is None for r in meta.requests)
    assert_matches_reference(PagedCpuAttention(), case, consecutive=True)
    shuffled = PagedCpuAttention().build(make_inputs(case)[0], lambda a: torch.from_numpy(np.ascontiguousarray(a)))
    assert any(r.ids is not None for r in shuffled.requests if r.num_blocks > 1)


def test_auto_picks_paged_on_cpu_and_never_reference():
    assert auto_backend_name(torch.device("cpu")) == "paged"
    assert make_backend("auto", torch.device("cpu")).name == "paged"
    assert make_backend("reference", torch.device("cpu")).name == "reference"


def test_unknown_backend_name_says_what_to_choose():
    with pytest.raises(ValueError, match="choose one of"):
        make_backend("flash", torch.device("cpu"))
