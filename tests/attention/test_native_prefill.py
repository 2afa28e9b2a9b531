"""The C prefill kernel of the paged CPU backend (`orcinus_paged_prefill` in `paged_attention.c`)
against the reference backend: chunks longer than its 16-row items, chunks after earlier context,
GQA groups that do not divide its 4-vector steps, head sizes 64 and 128 and an odd one, sliding
windows, float32 and bfloat16, one and several threads (OpenMP and pthreads builds)."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from attention_cases import Case, assert_matches_reference, make_inputs, torch_threads
from orcinus.attention import native
from orcinus.attention.paged_cpu import PagedCpuAttention
from orcinus.attention.reference import ReferenceAttention

needs_compiler = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                    reason="no C compiler on this machine")

PREFILL_CASES = [
    # the default model's shape: 9 heads over 3 KV heads of 64; whole prompts and later chunks
    Case("smollm2-prompts", [40, 1, 77, 16, 33], [40, 90, 77, 50, 33], 9, 3, 64, 16),
    Case("chunk-after-context-d128", [50, 1, 17], [130, 20, 17], 4, 2, 128, 16),
    Case("mha-odd-head-size", [19, 1, 35], [19, 5, 70], 3, 3, 24, 4),
    Case("gqa-window-crossing-items", [48, 1, 21], [48, 60, 100], 6, 2, 64, 8, sliding_window=20),
    Case("window-shorter-than-item", [40, 3], [40, 3], 2, 1, 64, 4, sliding_window=5),
    Case("one-kv-head-eight-queries", [33], [33], 8, 1, 32, 16),
]


def upload(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


@needs_compiler
def test_the_prefill_kernel_takes_every_chunk():
    layout = make_inputs(PREFILL_CASES[0])[0]
    meta = PagedCpuAttention().build(layout, upload)
    assert meta.native is not None and meta.native.prefills is not None
    assert meta.native.prefills.query_lens.tolist() == [40, 77, 16, 33]
    assert meta.native.prefills.query_starts.tolist() == [0, 41, 118, 134]


@needs_compiler
@pytest.mark.parametrize("threads", [1, 4])
@pytest.mark.parametrize("case", PREFILL_CASES, ids=lambda c: c.name)
def test_prefill_kernel_matches_reference(case, threads):
    with torch_threads(threads):
        assert_matches_reference(PagedCpuAttention(), case, atol=2e-5)
        assert_matches_reference(PagedCpuAttention(), case, seed=5, consecutive=True, atol=2e-5)


@needs_compiler
@pytest.mark.parametrize("case", PREFILL_CASES[:2], ids=lambda c: c.name)
def test_prefill_kernel_in_bfloat16_matches_reference_in_float32(case):
    layout, q, k, v, k_cache, v_cache = make_inputs(case)
    ref = ReferenceAttention()
    expected = ref.forward(q, k, v, k_cache.clone(), v_cache.clone(), ref.build(layout, upload), case.head_dim ** -0.5)
    backend = PagedCpuAttention()
    bf = [t.to(torch.bfloat16) for t in (q, k, v, k_cache, v_cache)]
    got = backend.forward(*bf, backend.build(layout, upload), case.head_dim ** -0.5)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, atol=3e-2, rtol=3e-2)


@needs_compiler
def test_prefill_kernel_reads_a_strided_query():
    case = PREFILL_CASES[0]
    layout, q, k, v, k_cache, v_cache = make_inputs(case)
    wide = torch.cat([q, torch.full_like(q, 1e4)], dim=1)
    strided = wide[:, :case.num_heads]
    scale = case.head_dim ** -0.5
    ref = ReferenceAttention()
    expected = ref.forward(q, k, v, k_cache.clone(), v_cache.clone(), ref.build(layout, upload), scale)
    backend = PagedCpuAttention()
    got = backend.forward(strided, k, v, k_cache, v_cache, backend.build(layout, upload), scale)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


@needs_compiler
@pytest.mark.parametrize("threads", [1, 3])
def test_prefill_in_the_pthreads_build_matches_reference(threads, monkeypatch):
    monkeypatch.setattr(native, "OPENMP_FLAGS", [])
    native.reset_for_tests()
    try:
        with torch_threads(threads):
            assert native.load() is not None and not native.uses_openmp()
            for case in PREFILL_CASES[:4]:
                assert_matches_reference(PagedCpuAttention(), case, atol=2e-5)
    finally:
        native.reset_for_tests()


@needs_compiler
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("case", [PREFILL_CASES[0], PREFILL_CASES[3], PREFILL_CASES[1], PREFILL_CASES[2]],
                         ids=lambda c: c.name)
def test_a_float16_pool_is_read_as_the_reference_reads_it(case, threads):
    """kv_cache_dtype=float16: the kernels convert the pool's halves as they load them (decodes and
    prompt chunks, float32 queries); the reference converts the gathered blocks."""
    layout, q, k, v, k_cache, v_cache = make_inputs(case)
    k_half, v_half = k_cache.to(torch.float16), v_cache.to(torch.float16)
    scale = case.head_dim ** -0.5
    ref = ReferenceAttention()
    expected = ref.forward(q, k, v, k_half.clone(), v_half.clone(), ref.build(layout, upload), scale, case.sliding_window)
    with torch_threads(threads):
        backend = PagedCpuAttention()
        meta = backend.build(layout, upload)
        assert meta.native is not None
        got = backend.forward(q, k, v, k_half, v_half, meta, scale, case.sliding_window)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    # and the half pool is not the float32 one: the test would see a kernel reading it as float32
    full = ref.forward(q, k, v, k_cache.clone(), v_cache.clone(), ref.build(layout, upload), scale, case.sliding_window)
    assert (full - expected).abs().max() > 1e-5
