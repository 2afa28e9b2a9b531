"""Weights packed at load for the register tiles (quant_packed.h, packed_weights.py) against the
GGUF blocks they came from: the same products bit for bit where the blocks take the tiles, the same
dequantised rows, the packed size, and the model-level packing (which segments, what stays)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_quantized_linear import _has_avx512, _param, _rounded_reference, _weight  # noqa: E402

from orcinus.layers import packed_weights, quant_native  # noqa: E402
from orcinus.layers import quantized_linear as ql  # noqa: E402

PACKABLE = [T.Q4_0, T.Q4_1, T.Q8_0]


@pytest.fixture(scope="module")
def lib():
    lib = quant_native.load()
    if lib is None:
        pytest.fail(f"the quantized C kernel did not build here: {quant_native.why_unavailable()}")
    if lib.orcinus_quant_tile_rows() <= 0:
        assert not _has_avx512()
        pytest.skip("no register tiles in this build (no AVX-512): nothing is packed here")
    return lib


def _packed(lib, qtype, raw: torch.Tensor, rows: int, cols: int) -> ql.Segment:
    ptype = lib.orcinus_quant_packed_type(int(qtype))
    assert ptype == int(qtype) + 100
    out = torch.empty(rows, cols // 32 * ql.PACKED_TYPES[ptype][2], dtype=torch.uint8)
    assert lib.orcinus_quant_pack(int(qtype), raw.data_ptr(), rows, cols, raw.shape[1], out.data_ptr(), 2) == 0
    return ql.Segment(0, rows, ptype, out)


@pytest.mark.parametrize("qtype", PACKABLE, ids=lambda t: t.name)
def test_packed_products_equal_the_blocks_tiles(lib, qtype) -> None:
    """From TILE_MIN_ROWS rows the blocks run the same tiles: the packed weight must give the same
    floats exactly; below it (the blocks' row kernel) the same to float rounding, and both against
    the reference weights times the rounded activations."""
    rows, cols = 96, 576
    raw, ref = _weight(qtype, rows, cols, seed=7)
    packed = _packed(lib, qtype, raw, rows, cols)
    assert packed.raw.numel() == rows * cols // 32 * ql.PACKED_TYPES[packed.qtype][2]
    for batch in (1, 2, 3, 5, 6, 13, 23, 64):
        x = torch.randn(batch, cols, generator=torch.Generator().manual_seed(batch)) * 3
        x[batch // 2, 32:64] = 0  # a zero block (scale 0)
        act = ql.quantize_activations(lib, x)
        got, blocks = torch.empty(batch, rows), torch.empty(batch, rows)
        ql._kernel_matmul(lib, packed, cols, act, got, got)
        ql._kernel_matmul(lib, ql.Segment(0, rows, int(qtype), raw), cols, act, blocks, blocks)
        exact = _rounded_reference(x) @ ref.t()
        assert (got - exact).abs().max() <= 1e-4 * exact.abs().max(), batch
        if batch >= lib.orcinus_quant_tile_rows():
            assert torch.equal(got, blocks), batch
        else:
            assert (got - blocks).abs().max() <= 1e-5 * exact.abs().max(), batch


@pytest.mark.parametrize("qtype", PACKABLE, ids=lambda t: t.name)
def test_packed_rows_dequantise_like_the_blocks(lib, qtype) -> None:
    rows, cols = 64, 320
    raw, ref = _weight(qtype, rows, cols, seed=3)
    packed = _packed(lib, qtype, raw, rows, cols)
    assert torch.equal(ql.dequantize(packed.qtype, packed.raw, cols), ref)
    ids = torch.tensor([63, 0, 17, 31, 32, 17])
    assert torch.equal(ql.dequantize(packed.qtype, packed.raw, cols, ids=ids), ref[ids])
    assert torch.equal(ql.dequantize(packed.qtype, packed.raw, cols, torch.bfloat16, ids=ids),
                       ref[ids].to(torch.bfloat16))


def test_packer_refuses_what_it_cannot_pack(lib) -> None:
    raw, _ = _weight(T.Q4_1, 40, 576)  # 40 rows: not whole strips of 32
    out = torch.empty(40 * 18 * 20, dtype=torch.uint8)
    assert lib.orcinus_quant_pack(int(T.Q4_1), raw.data_ptr(), 40, 576, raw.shape[1], out.data_ptr(), 1) == -1
    raw6, _ = _weight(T.Q6_K, 32, 512)  # a K-quant: the per-call tiles read it
    assert lib.orcinus_quant_packed_type(int(T.Q6_K)) == 0
    assert lib.orcinus_quant_pack(int(T.Q6_K), raw6.data_ptr(), 32, 512, raw6.shape[1], out.data_ptr(), 1) == -1
    # a Q8_0 scale of 1024: -128 * 1024 is no half, so that weight keeps its blocks
    big = np.zeros((32, 34), dtype=np.uint8)
    big[:, :2] = np.frombuffer(np.float16(1024).tobytes(), dtype=np.uint8)
    big_t = torch.from_numpy(big)
    out8 = torch.empty(32 * 36, dtype=torch.uint8)
    assert lib.orcinus_quant_pack(int(T.Q8_0), big_t.data_ptr(), 32, 32, 34, out8.data_ptr(), 1) == -2


def test_pack_for_tiles_packs_float32_whole_strips_only(lib, monkeypatch) -> None:
    raw41, _ = _weight(T.Q4_1, 64, 576)
    raw8, ref8 = _weight(T.Q8_0, 32, 576, seed=1)
    raw6, _ = _weight(T.Q6_K, 32, 512)
    raw_odd, _ = _weight(T.Q4_0, 40, 576)
    model = torch.nn.Module()
    # a merged weight of two segments (both packed, one buffer), a K-quant, a ragged one, a bfloat16 one
    merged = torch.nn.Parameter(torch.cat([raw41.reshape(-1), raw8.reshape(-1)]), requires_grad=False)
    merged.quant = ql.QuantState(576, 96, torch.float32, [ql.Segment(0, 64, int(T.Q4_1), raw41),
                                                          ql.Segment(64, 32, int(T.Q8_0), raw8)])
    model.merged = merged
    model.k = _param(T.Q6_K, raw6, 32, 512)
    model.odd = _param(T.Q4_0, raw_odd, 40, 576)
    bf = _param(T.Q4_1, raw41.clone(), 64, 576)
    bf.quant.dtype = torch.bfloat16
    model.bf = bf
    model.emb = _param(T.Q8_0, raw8.clone(), 32, 576)  # a tied embedding / LM head
    x = torch.randn(9, 576)
    before = ql.linear(x, model.merged)
    assert packed_weights.pack_for_tiles(model) == 3
    assert [s.qtype for s in model.merged.quant.segments] == [103, 108]
    assert model.merged.data.numel() == 64 * 18 * 20 + 32 * 18 * 36  # one buffer, the segments views of it
    assert all(s.raw.untyped_storage().data_ptr() == model.merged.untyped_storage().data_ptr()
               for s in model.merged.quant.segments)
    assert torch.equal(ql.linear(x, model.merged), before)
    assert model.emb.quant.segments[0].qtype == 108
    assert torch.equal(ql.embedding(torch.tensor([[6, 0], [31, 6]]), model.emb), ref8[torch.tensor([[6, 0], [31, 6]])])
    assert model.k.quant.segments[0].qtype == int(T.Q6_K)
    assert model.odd.quant.segments[0].qtype == int(T.Q4_0)
    assert model.bf.quant.segments[0].qtype == int(T.Q4_1)
    monkeypatch.setenv("ORCINUS_PACK_WEIGHTS", "0")
    again = torch.nn.Module()
    again.w = _param(T.Q4_1, raw41, 64, 576)
    assert packed_weights.pack_for_tiles(again) == 0 and again.w.quant.segments[0].qtype == int(T.Q4_1)
