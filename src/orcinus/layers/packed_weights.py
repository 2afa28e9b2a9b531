"""Quantized weights packed once, at load, in the order the C kernel's register tiles read them.

The tiles (`quant_tiles.h`) otherwise repack each strip of 32 output features from its GGUF blocks
on every call: 9.4 % of a one-thread run of the 64-request trace, paid at every layer of every
step. `pack_for_tiles` rewrites each Q4_0, Q4_1 and Q8_0 segment of a float32 model into the
packed layout of `quant_packed.h` (still 4-bit, or 8-bit for Q8_0, with half-precision scales: the
same bytes as Q4_1, 2 more per 32 weights for Q8_0 and Q4_0), which the kernel then reads at every
batch size, one row included; results equal the per-call tiles' bit for bit (docs/benchmarks.md,
"Issue 21, sixth round").

Packed only where the tiles would have read the weight: a float32 model on a CPU whose kernel
build has the tiles (AVX-512), and segments of whole strips. bfloat16 models keep their blocks
(their large batches dequantise rows of them for a torch GEMM). `ORCINUS_PACK_WEIGHTS=0` keeps
every weight in its blocks (the A/B switch of the measurement).
"""
from __future__ import annotations

import os

import torch
from torch import nn

from orcinus.layers import quant_native
from orcinus.layers import quantized_linear as quant

STRIP = 32  # output features per strip (quant_tiles.h)


def enabled() -> bool:
    return os.environ.get("ORCINUS_PACK_WEIGHTS", "1") != "0"


def pack_for_tiles(model: nn.Module) -> int:
    """Pack every eligible segment of the model's quantized float32 weights; returns how many."""
    lib = quant_native.load()
    if lib is None or not enabled() or lib.orcinus_quant_tile_rows() <= 0:
        return 0
    count = 0
    for module in model.modules():
        for _, param in module.named_parameters(recurse=False):
            state = quant.quantized(param)
            if state is None or state.dtype != torch.float32:
                continue
            changed = False
            for seg in state.segments:
                packed_type = lib.orcinus_quant_packed_type(seg.qtype) if seg.qtype != quant.FLOAT else 0
                if packed_type == 0 or seg.out_rows % STRIP or state.in_features % 32:
                    continue
                _, _, bytes_per_32 = quant.PACKED_TYPES[packed_type]
                out = torch.empty(seg.out_rows, state.in_features // 32 * bytes_per_32, dtype=torch.uint8)
                status = lib.orcinus_quant_pack(seg.qtype, seg.raw.data_ptr(), seg.out_rows, state.in_features,
                                                seg.raw.shape[1], out.data_ptr(), torch.get_num_threads())
                if status != 0:  # -2: a scale term not exact in half precision: the blocks stay
                    continue
                seg.qtype, seg.raw = packed_type, out
                changed, count = True, count + 1
            if changed:
                quant.set_param_data(param, state)
    return count
