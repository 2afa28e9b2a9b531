"""The C decode kernel of the paged CPU backend (`paged_attention.c` via `native.py`) against the
reference backend: float32 and bfloat16, one and several threads, sliding windows, GQA, a query
that is a strided view, and the PyTorch path that replaces it where no compiler works."""
from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
import torch

from attention_cases import CASES, Case, assert_matches_reference, make_inputs, run_backend, torch_threads
from orcinus.attention import native
from orcinus.attention.paged_cpu import PagedCpuAttention
from orcinus.attention.reference import ReferenceAttention

needs_compiler = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                    reason="no C compiler on this machine")


def upload(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


@pytest.fixture
def torch_path(monkeypatch):
    monkeypatch.setenv("ORCINUS_NATIVE_KERNELS", "0")
    native.reset_for_tests()
    yield
    monkeypatch.delenv("ORCINUS_NATIVE_KERNELS")
    native.reset_for_tests()


@needs_compiler
def test_the_kernel_builds_here_and_takes_the_decodes():
    assert native.load() is not None, native.why_unavailable()
    layout = make_inputs(CASES[0])[0]
    meta = PagedCpuAttention().build(layout, upload)
    assert meta.native is not None
    assert meta.native.rows.tolist() == [5, 6, 10]  # the decodes' rows in the flat batch
    assert meta.native.prefills.query_lens.tolist() == [5, 3]  # the prompt chunks, for the prefill kernel


@needs_compiler
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_kernel_matches_reference(case, threads):
    with torch_threads(threads):
        assert_matches_reference(PagedCpuAttention(), case)
        assert_matches_reference(PagedCpuAttention(), case, seed=3, consecutive=True)


@needs_compiler
@pytest.mark.parametrize("head_dim", [64, 128])  # the kernel's compile-time head sizes
def test_many_decodes_over_long_contexts_split_across_threads(head_dim):
    rng = np.random.default_rng(0)
    seq_lens = rng.integers(1, 300, size=40).tolist()
    case = Case("many-decodes", [1] * 40, seq_lens, 9, 3, head_dim, 16)
    with torch_threads(4):
        assert_matches_reference(PagedCpuAttention(), case)
        case.sliding_window = 37
        assert_matches_reference(PagedCpuAttention(), case)


@needs_compiler
@pytest.mark.parametrize("case", CASES[:2] + [Case("gqa-d64", [1, 1, 3], [40, 7, 20], 8, 2, 64, 16)],
                         ids=lambda c: c.name)
def test_kernel_in_bfloat16_matches_reference_in_float32(case):
    layout, q, k, v, k_cache, v_cache = make_inputs(case)
    want = ReferenceAttention()
    meta = want.build(layout, upload)
    expected = want.forward(q, k, v, k_cache.clone(), v_cache.clone(), meta, case.head_dim ** -0.5)
    backend = PagedCpuAttention()
    meta = backend.build(layout, upload)
    bf = [t.to(torch.bfloat16) for t in (q, k, v, k_cache, v_cache)]
    got = backend.forward(*bf, meta, case.head_dim ** -0.5)
    assert got.dtype == torch.bfloat16
    decode_rows = torch.from_numpy(meta.native.rows)
    torch.testing.assert_close(got[decode_rows].float(), expected[decode_rows], atol=3e-2, rtol=3e-2)


@needs_compiler
def test_a_strided_query_is_read_by_its_row_stride():
    case = CASES[0]
    layout, q, k, v, k_cache, v_cache = make_inputs(case)
    wide = torch.cat([q, torch.full_like(q, 1e4)], dim=1)  # q is the first half of every row
    strided = wide[:, :case.num_heads]
    assert not strided.is_contiguous()
    scale = case.head_dim ** -0.5
    ref = ReferenceAttention()
    expected = ref.forward(q, k, v, k_cache.clone(), v_cache.clone(), ref.build(layout, upload), scale)
    backend = PagedCpuAttention()
    got = backend.forward(strided, k, v, k_cache, v_cache, backend.build(layout, upload), scale)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_without_the_kernel_the_torch_path_matches_reference(case, torch_path):
    assert native.load() is None and native.why_unavailable() == "ORCINUS_NATIVE_KERNELS=0"
    assert PagedCpuAttention().build(make_inputs(case)[0], upload).native is None
    assert_matches_reference(PagedCpuAttention(), case)


def test_a_missing_compiler_is_said_and_the_torch_path_kept(monkeypatch, caplog):
    monkeypatch.setattr(native, "_compiler", lambda: None)
    native.reset_for_tests()
    try:
        assert native.load() is None
        assert "no C compiler" in native.why_unavailable()
        assert "per-request PyTorch path" in caplog.text
        out, _, _ = run_backend(PagedCpuAttention(), CASES[0])
        want, _, _ = run_backend(ReferenceAttention(), CASES[0])
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-4)
    finally:
        native.reset_for_tests()


@needs_compiler
def test_the_build_is_cached_per_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("ORCINUS_CACHE", str(tmp_path))
    first = native._build(native._compiler())
    assert first.parent == tmp_path / "kernels" and first.exists()
    mtime = first.stat().st_mtime_ns
    assert native._build(native._compiler()) == first and first.stat().st_mtime_ns == mtime
    monkeypatch.setattr(native, "_cpu_identity", lambda: "another CPU")
    assert native._build(native._compiler()) != first


@pytest.fixture
def pthreads_build(monkeypatch):
    """The kernel as built where the compiler has no OpenMP: threads of its own (the build key
    holds the flags, so this build is cached beside the OpenMP one, built once)."""
    monkeypatch.setattr(native, "OPENMP_FLAGS", [])
    native.reset_for_tests()
    yield
    native.reset_for_tests()


@needs_compiler
def test_the_kernel_runs_on_openmp_where_the_compiler_has_it():
    version = subprocess.run([native._compiler(), "--version"], capture_output=True, text=True).stdout
    if "Free Software Foundation" not in version:  # GCC (as gcc or cc) always ships libgomp
        pytest.skip("the compiler is not GCC: whether it has OpenMP is its business")
    assert native.uses_openmp()


@needs_compiler
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[3]], ids=lambda c: c.name)  # with decodes
def test_the_pthreads_build_matches_reference(case, threads, pthreads_build):
    assert native.load() is not None and not native.uses_openmp()
    with torch_threads(threads):
        assert_matches_reference(PagedCpuAttention(), case)


@needs_compiler
def test_the_kernel_is_built_when_a_cpu_worker_starts_not_in_its_first_decode(checkpoint_factory, monkeypatch):
    from orcinus.config import EngineConfig
    from orcinus.executor.messages import BatchMessage, CachedRequestData, NewRequestData, SamplingSettings
    from orcinus.executor.worker import Worker

    folder, _ = checkpoint_factory("llama")
    opened: list[str] = []
    real_open = native._open
    monkeypatch.setattr(native, "_open", lambda compiler: opened.append("start") or real_open(compiler))
    native.reset_for_tests()
    try:
        worker = Worker(EngineConfig(model=folder, dtype="float32", device="cpu", kv_cache_memory=1 << 20,
                                     block_size=4))
        assert opened == ["start"] and native._state["lib"] is not None  # loaded before any iteration
        worker.initialize_kv_cache(8)
        greedy = SamplingSettings(temperature=0.0)
        first = worker.execute(BatchMessage(0, [NewRequestData("r", [5, 6, 7], greedy, [0, 1])])).token_ids
        worker.execute(BatchMessage(1, [CachedRequestData("r", first[0])]))  # a decode: the kernel runs
        assert opened == ["start"]
    finally:
        native.reset_for_tests()
