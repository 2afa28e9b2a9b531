"""Quantized matmul against the dequantised reference (`gguf.quants.dequantize`), every supported
type, odd shapes, batches of 1 and 64, through the C kernel, the dequantise-then-GEMM path and the
pure-PyTorch path.

Tolerances: the kernels multiply the weights exactly as stored by activations rounded to 16-bit
integers per block of 32. Against the reference weights times those same rounded activations the
result must agree to float rounding (1e-4 of the output's scale). Against the unrounded
activations the rounding itself shows: at most 1/65534 of a block's largest value per element,
which over hundreds of products stays under 1e-4 of the output's largest magnitude; asserted
with margin at 5e-4.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize as gguf_dequantize

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from gguf_files import encode  # noqa: E402

from orcinus.layers import quant_native  # noqa: E402
from orcinus.layers import quantized_linear as ql  # noqa: E402

TYPES = [T.Q4_0, T.Q4_1, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K]


def _weight(qtype, rows: int, cols: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
    raw = np.ascontiguousarray(encode(w, qtype, rng))
    ref = gguf_dequantize(raw, qtype).reshape(rows, cols).astype(np.float32)
    return torch.from_numpy(raw), torch.from_numpy(ref)


def _param(qtype, raw: torch.Tensor, rows: int, cols: int) -> torch.nn.Parameter:
    p = torch.nn.Parameter(raw, requires_grad=False)
    p.quant = ql.QuantState(cols, rows, torch.float32, [ql.Segment(0, rows, int(qtype), raw)])
    return p


def _rounded_reference(x: torch.Tensor) -> torch.Tensor:
    """x rounded to int16 per block of 32 with the scale amax/32767, written out plainly."""
    blocks = x.view(x.shape[0], -1, 32)
    d = blocks.abs().amax(-1, keepdim=True) / 32767
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    return (torch.round(blocks * inv) * d).view_as(x)


@pytest.fixture(scope="module")
def lib():
    lib = quant_native.load()
    if lib is None:
        pytest.fail(f"the quantized C kernel did not build here: {quant_native.why_unavailable()}")
    return lib


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequantize_matches_gguf_exactly(lib, qtype) -> None:
    rows, cols = 37, 512
    raw, ref = _weight(qtype, rows, cols)
    assert torch.equal(ql.dequantize(int(qtype), raw, cols), ref)
    ids = torch.tensor([5, 0, 36, 5])
    assert torch.equal(ql.dequantize(int(qtype), raw, cols, ids=ids), ref[ids])
    bf16 = ql.dequantize(int(qtype), raw, cols, torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and torch.equal(bf16, ref.to(torch.bfloat16))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("batch", [1, 3, 64])
def test_kernel_matches_reference(lib, qtype, batch: int) -> None:
    # 37 output rows (not a multiple of any block or of the kernel's 4-row groups), 2 or 18 blocks in
    rows, cols = 37, 512 if qtype in (T.Q4_K, T.Q5_K, T.Q6_K) else 576
    raw, ref = _weight(qtype, rows, cols, seed=batch)
    x = torch.randn(batch, cols, generator=torch.Generator().manual_seed(batch))
    seg = ql.Segment(0, rows, int(qtype), raw)
    out = torch.empty(batch, rows)
    ql._kernel_matmul(lib, seg, cols, ql.quantize_activations(lib, x), out, out)
    exact = _rounded_reference(x) @ ref.t()
    scale = exact.abs().max()
    assert (out - exact).abs().max() <= 1e-4 * scale
    assert (out - x @ ref.t()).abs().max() <= 5e-4 * scale


def _has_avx512() -> bool:
    from orcinus.cpu_features import cpu_flags

    return "avx512bw" in cpu_flags()


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("features", [32, 69])
def test_register_tiles_match_reference(lib, qtype, features: int) -> None:
    """Batches from TILE_MIN_ROWS rows up run as register tiles of 32 features by 12/8/4/2/1 rows
    (every remainder below covered), the features past the last whole strip by the row kernel."""
    if _has_avx512():
        assert lib.orcinus_quant_tile_rows() > 0  # this CPU has them: they must be what runs here
    cols = 512 if qtype in (T.Q4_K, T.Q5_K, T.Q6_K) else 576
    raw, ref = _weight(qtype, features, cols, seed=features)
    for batch in (6, 7, 13, 23, 35, 64):
        x = torch.randn(batch, cols, generator=torch.Generator().manual_seed(batch)) * 3
        x[batch // 2, 32:64] = 0  # a zero block (scale 0)
        out = torch.empty(batch, features)
        ql._kernel_matmul(lib, ql.Segment(0, features, int(qtype), raw), cols, ql.quantize_activations(lib, x), out, out)
        exact = _rounded_reference(x) @ ref.t()
        assert (out - exact).abs().max() <= 1e-4 * exact.abs().max(), batch
        one = torch.empty(1, features)  # the row kernel, one row: the same numbers
        ql._kernel_matmul(lib, ql.Segment(0, features, int(qtype), raw), cols,
                          ql.quantize_activations(lib, x[-1:]), one, one)
        assert (out[-1:] - one).abs().max() <= 1e-5 * exact.abs().max(), batch


def test_float32_never_dequantises_with_tiles(lib, monkeypatch) -> None:
    """With the tiles a float32 batch of any size takes the kernel (no dequantisation), bfloat16
    from a crossover on; without them (other builds) float32 dequantises from DEQUANT_MIN_ROWS."""
    calls = []
    real = ql.dequantize
    monkeypatch.setattr(ql, "dequantize", lambda *a, **k: calls.append(1) or real(*a, **k))
    raw, _ = _weight(T.Q4_1, 32, 576)
    weight = _param(T.Q4_1, raw, 32, 576)
    ql.linear(torch.randn(300, 576), weight)
    tiles = lib.orcinus_quant_tile_rows() > 0
    assert (not calls) == tiles
    assert ql.dequant_min_rows(torch.float32) == (ql.NEVER if tiles else ql.DEQUANT_MIN_ROWS)
    assert 0 < ql.dequant_min_rows(torch.bfloat16) <= ql.TILED_DEQUANT_MIN_ROWS_BF16
    assert ql.dequant_min_rows(torch.float16) == 0


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("batch", [1, 64, 200])
def test_linear_paths_agree(lib, qtype, batch: int) -> None:
    """`linear` (kernel below DEQUANT_MIN_ROWS rows, dequantise-then-GEMM from there) gives each row
    the same result whatever the batch: both paths use the same 16-bit activations."""
    rows, cols = 70, 512
    raw, ref = _weight(qtype, rows, cols)
    weight = _param(qtype, raw, rows, cols)
    bias = torch.randn(rows)
    x = torch.randn(batch, cols, generator=torch.Generator().manual_seed(7))
    y = ql.linear(x, weight, bias)
    exact = _rounded_reference(x) @ ref.t() + bias
    assert y.shape == (batch, rows)
    assert (y - exact).abs().max() <= 1e-4 * exact.abs().max()
    alone = ql.linear(x[:1], weight, bias)  # one row alone takes the kernel
    assert (alone - y[:1]).abs().max() <= 1e-4 * exact.abs().max()
    tiled = ql._DEQUANT_TILE_ELEMENTS
    try:  # several tiles of output rows in the dequantise path
        ql._DEQUANT_TILE_ELEMENTS = 64 * cols // 2
        assert torch.allclose(ql.linear(x, weight, bias), y, rtol=0, atol=1e-4 * float(exact.abs().max()))
    finally:
        ql._DEQUANT_TILE_ELEMENTS = tiled


@pytest.mark.parametrize("rows, cols", [(1, 576), (64, 1536), (300, 64)])
def test_round_activations_equals_the_kernels_rounding(lib, rows: int, cols: int) -> None:
    """The GEMM path's one-pass rounding gives exactly the values the kernel multiplies (the
    integers times their block scale), zero blocks included."""
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(3)) * 4
    x[0, :32] = 0
    expected = ql._rounded(ql.quantize_activations(lib, x), torch.float32)
    assert torch.equal(ql.round_activations(lib, x, torch.float32), expected)
    assert not torch.equal(expected, x)  # it does round


def test_bfloat16_activations(lib) -> None:
    raw, ref = _weight(T.Q4_1, 40, 576)
    weight = _param(T.Q4_1, raw, 40, 576)
    weight.quant.dtype = torch.bfloat16
    for batch in (2, 80):
        x = torch.randn(batch, 576).to(torch.bfloat16)
        y = ql.linear(x, weight)
        assert y.dtype == torch.bfloat16
        exact = _rounded_reference(x.float()) @ ref.t()
        assert (y.float() - exact).abs().max() <= 2e-2 * exact.abs().max()  # bfloat16 output


def test_mixed_segments_and_embedding(lib) -> None:
    """A merged weight whose parts differ in type (Q4_K q/k, Q6_K v) and a float part."""
    cols = 256
    parts = [_weight(T.Q4_K, 64, cols, 1), _weight(T.Q4_K, 32, cols, 2), _weight(T.Q6_K, 32, cols, 3)]
    flo = torch.randn(16, cols)
    param = torch.nn.Parameter(torch.empty(144, cols), requires_grad=False)
    state = ql.QuantState(cols, 144, torch.float32)
    param.quant = state
    offset = 0
    for i, (qt, (raw, _)) in enumerate(zip([T.Q4_K, T.Q4_K, T.Q6_K], parts)):
        state.pending[i] = (offset, ql.GGUFTensor(int(qt), raw, (raw.shape[0], cols)))
        offset += raw.shape[0]
    state.pending[3] = (offset, ql.GGUFTensor(ql.FLOAT, flo, (16, cols)))
    module = torch.nn.Module()
    module.weight = param
    assert ql.finalize(module) == 1
    assert [s.qtype for s in state.segments] == [int(T.Q4_K), int(T.Q6_K), ql.FLOAT]
    assert param.dtype == torch.uint8
    full = torch.cat([parts[0][1], parts[1][1], parts[2][1], flo])
    for batch in (1, 70):
        x = torch.randn(batch, cols)
        y = ql.linear(x, param)
        exact = torch.cat([_rounded_reference(x) @ full[:128].t(), x @ flo.t()], dim=1)
        assert (y - exact).abs().max() <= 1e-4 * exact.abs().max()
    ids = torch.tensor([[3, 0], [63, 3]])
    emb_raw, emb_ref = _weight(T.Q8_0, 64, cols)
    emb = _param(T.Q8_0, emb_raw, 64, cols)
    assert torch.equal(ql.embedding(ids, emb), emb_ref[ids])


def test_input_columns_only_at_block_boundaries() -> None:
    raw, ref = _weight(T.Q4_K, 8, 512)
    t = ql.GGUFTensor(int(T.Q4_K), raw, (8, 512))
    half = t.cols(256, 256)
    assert half is not None and torch.equal(half.full(), ref[:, 256:])
    assert t.cols(128, 256) is None  # mid-block: the loader dequantises that shard instead
    assert torch.equal(t.narrow(1, 128, 256), ref[:, 128:384])


def test_pure_pytorch_path_without_a_compiler(monkeypatch) -> None:
    monkeypatch.setenv("ORCINUS_NATIVE_KERNELS", "0")
    quant_native.reset_for_tests()
    try:
        assert quant_native.load() is None and "ORCINUS_NATIVE_KERNELS=0" in quant_native.why_unavailable()
        raw, ref = _weight(T.Q5_K, 20, 256)
        weight = _param(T.Q5_K, raw, 20, 256)
        x = torch.randn(3, 256)
        assert torch.allclose(ql.linear(x, weight), x @ ref.t(), atol=1e-5)  # float activations: exact
    finally:
        monkeypatch.delenv("ORCINUS_NATIVE_KERNELS")
        quant_native.reset_for_tests()


@pytest.mark.parametrize("march", ["x86-64-v4", "x86-64-v3", "x86-64"], ids=["avx512-no-vnni", "avx2", "scalar"])
def test_other_instruction_sets_match(monkeypatch, march: str) -> None:
    """The AVX-512 build without VNNI (tiles with `madd`), the AVX2 and plain-C builds (what other
    CPUs get from -march=native) compute the same."""
    import platform

    from orcinus.attention import native

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86 instruction-set variants")
    if march == "x86-64-v4" and not _has_avx512():
        pytest.skip("this CPU cannot run an AVX-512 build")
    flags = [f for f in native.COMPILE_FLAGS if not f.startswith(("-march", "-mprefer"))] + [f"-march={march}"]
    monkeypatch.setattr(native, "COMPILE_FLAGS", flags)
    quant_native.reset_for_tests()
    try:
        lib = quant_native.load()
        assert lib is not None, quant_native.why_unavailable()
        assert (lib.orcinus_quant_tile_rows() > 0) == (march == "x86-64-v4")
        for qtype in TYPES:
            raw, ref = _weight(qtype, 37, 512)
            for batch in (5, 29):
                x = torch.randn(batch, 512, generator=torch.Generator().manual_seed(3))
                out = torch.empty(batch, 37)
                ql._kernel_matmul(lib, ql.Segment(0, 37, int(qtype), raw), 512, ql.quantize_activations(lib, x),
                                  out, out)
                exact = _rounded_reference(x) @ ref.t()
                assert (out - exact).abs().max() <= 1e-4 * exact.abs().max(), (qtype.name, batch)
            assert torch.equal(ql.dequantize(int(qtype), raw, 512), ref), qtype.name
    finally:
        monkeypatch.undo()
        quant_native.reset_for_tests()
