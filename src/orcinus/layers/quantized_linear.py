"""The quantized linear method: weights kept in their GGUF blocks, multiplied without dequantising
the whole model.

A GGUF file read with `keep_quantized` hands every 2-D tensor over as a `GGUFTensor` (its raw
blocks, its ggml type). The linear layers' weight loaders (`layers/linear.py`) pass such a tensor
here, which keeps this rank's rows (output features; the input dimension only at block
boundaries) in their blocks and stores them on the parameter: `param.data` becomes the raw bytes
(uint8) and `param.quant` a `QuantState` saying how to read them. The layers' forwards call
`linear` / `embedding` below, which dispatch on that state:

- the C kernel (`quant_kernels.c`): integer dot products against activations rounded to 16-bit
  integers per block of 32, reading the weight in its blocks; with AVX-512 batches of rows run as
  register tiles (`quant_tiles.h`), and float32 takes this path at every batch size;
- many rows where a torch GEMM is faster (bfloat16, or no AVX-512): the rows dequantised into the
  activations' dtype, then one GEMM (the crossover, `dequant_min_rows`, measured: docs/benchmarks.md,
  "Quantized weights" and "Quantized matmul tiles");
- no compiler: the weight dequantised by `gguf.quants.dequantize`, then `F.linear` (slow, exact).

A merged linear (q/k/v, gate/up) whose parts differ in type (Q4_K_M files mix Q4_K and Q6_K)
keeps one segment per run of parts of the same type; float parts stay float.
"""
from __future__ import annotations

import functools
import logging
import threading
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from orcinus.errors import ConfigError
from orcinus.layers import quant_native

log = logging.getLogger("orcinus")

# ggml type id -> (name, elements per block, bytes per block): the formats the kernel reads.
QUANT_TYPES: dict[int, tuple[str, int, int]] = {
    2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 8: ("Q8_0", 32, 34),
    12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210),
}
# The layouts the kernel packs Q4_0, Q4_1 and Q8_0 into at load (quant_packed.h, packed_weights.py):
# id -> (name, elements per chunk, bytes per chunk). Never read from a file.
PACKED_TYPES: dict[int, tuple[str, int, int]] = {102: ("Q4_0, packed", 32, 20), 103: ("Q4_1, packed", 32, 20),
                                                 108: ("Q8_0, packed", 32, 36)}
FLOAT = -1  # a segment held as a float tensor
# Where the C kernel has no register tiles (no AVX-512), from this many rows up the
# dequantise-then-GEMM path runs; below it the row kernel. Measured on an Intel Xeon (AMX) with 2
# threads (docs/benchmarks.md, "Quantized weights"): for float32 the 64-request trace ran the same
# with 16 or 32 and slower with 8; a bfloat16 GEMM runs on the AMX tiles, so there the
# dequantisation pays from fewer rows (8: 7 % faster than 32).
DEQUANT_MIN_ROWS = 32
DEQUANT_MIN_ROWS_BF16 = 8
# With the register tiles (AVX-512, quant_tiles.h) the kernel outruns dequantise + float32 GEMM
# at every batch measured (1-512 rows; even float32 weights, `--quantization none`): float32
# batches never dequantise. A bfloat16 GEMM (avx512_bf16 without AMX) overtakes the tiles from
# 128-512 rows depending on the shape, 256 overall (docs/benchmarks.md, "Quantized matmul tiles");
# with AMX the crossover measured against the row kernel (8) stands.
TILED_DEQUANT_MIN_ROWS_BF16 = 256
NEVER = 1 << 62
_OUT_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
# Elements of the weight dequantised per GEMM of that path (8 MiB of float32): every layer of the
# default model in one piece; its LM head in 15 tiles. Smaller tiles (2 MiB) cost more GEMM calls.
_DEQUANT_TILE_ELEMENTS = 1 << 21


@dataclass
class GGUFTensor:
    """A GGUF checkpoint tensor in its stored form: `raw` is uint8 [rows, row bytes] for a quantized
    type, else a float tensor. Satisfies the loaders' `CheckpointTensor` (full / narrow dequantise)."""

    qtype: int  # ggml type id (FLOAT for float data)
    raw: torch.Tensor
    shape: tuple[int, int]  # logical [rows, in_features]

    @property
    def quantized(self) -> bool:
        return self.qtype != FLOAT

    def rows(self, start: int, length: int) -> "GGUFTensor":
        return GGUFTensor(self.qtype, self.raw.narrow(0, start, length), (length, self.shape[1]))

    def cols(self, start: int, length: int) -> "GGUFTensor | None":
        """Input features [start, start + length), or None when they do not fall on block boundaries."""
        if not self.quantized:
            return GGUFTensor(FLOAT, self.raw.narrow(1, start, length), (self.shape[0], length))
        _, block, size = QUANT_TYPES[self.qtype]
        if start % block or length % block:
            return None
        return GGUFTensor(self.qtype, self.raw.narrow(1, start // block * size, length // block * size),
                          (self.shape[0], length))

    def full(self) -> torch.Tensor:
        return self.raw if not self.quantized else dequantize(self.qtype, self.raw, self.shape[1])

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        if dim == 0:
            return self.rows(start, length).full()
        part = self.cols(start, length)
        return part.full() if part is not None else self.full().narrow(1, start, length)


@dataclass
class Segment:
    out_start: int
    out_rows: int
    qtype: int
    raw: torch.Tensor  # uint8 [out_rows, row bytes], or float [out_rows, in_features]


@dataclass
class QuantState:
    in_features: int
    out_features: int
    dtype: torch.dtype  # the activations' / outputs' dtype (the model's)
    segments: list[Segment] = field(default_factory=list)
    pending: dict[int, tuple[int, GGUFTensor]] = field(default_factory=dict)  # merged: part -> (offset, tensor)


def keep_quantized(mode: str, device: torch.device) -> bool:
    """Whether a GGUF file's quantized tensors stay in their blocks (EngineConfig.quantization):
    `auto` on CPU when the C kernel builds, `gguf` on CPU always, never with `none` or on GPUs."""
    if mode == "none":
        return False
    if device.type != "cpu":
        if mode == "gguf":
            raise ConfigError(f"quantization='gguf' runs on CPU only (device {device}); use "
                              "quantization='none' or 'auto' (which dequantises on GPUs)")
        return False
    return mode == "gguf" or quant_native.load() is not None


def dequant_min_rows(dtype: torch.dtype) -> int:
    """From how many activation rows `linear` dequantises the weight for a torch GEMM in `dtype`
    (0: always, as without the C kernel; NEVER: the kernel takes every batch)."""
    lib = quant_native.load()
    if lib is None or dtype not in _OUT_DTYPES:
        return 0
    tiles = lib.orcinus_quant_tile_rows() > 0
    if dtype == torch.bfloat16:
        return TILED_DEQUANT_MIN_ROWS_BF16 if tiles and not _amx_bf16() else DEQUANT_MIN_ROWS_BF16
    return NEVER if tiles else DEQUANT_MIN_ROWS


@functools.lru_cache(maxsize=1)
def _amx_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 on AMX tiles (read once: `linear` asks every call)."""
    from orcinus.cpu_features import cpu_flags

    return "amx_bf16" in cpu_flags()


def is_gguf_tensor(loaded: object) -> bool:
    return isinstance(loaded, GGUFTensor)


def quantized(weight: torch.Tensor) -> QuantState | None:
    return getattr(weight, "quant", None)


# ----------------------------------------------------------------------------- dequantisation

def dequantize(qtype: int, raw: torch.Tensor, in_features: int, dtype: torch.dtype = torch.float32,
               ids: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows of a block-quantized weight (all, or `ids`) as a [rows, in_features] tensor (written
    into `out`, a contiguous tensor of that shape and dtype, when given)."""
    lib = quant_native.load()
    raw = raw if raw.is_contiguous() else raw.contiguous()
    if lib is None or dtype not in _OUT_DTYPES:
        rows = _dequantize_reference(qtype, raw if ids is None else raw[ids], in_features).to(dtype)
        return rows if out is None else out.copy_(rows)
    n = raw.shape[0] if ids is None else ids.numel()
    if out is None:
        out = torch.empty(n, in_features, dtype=dtype)
    ids_c = None if ids is None else ids.to(torch.int64).contiguous()
    status = lib.orcinus_quant_dequantize(qtype, raw.data_ptr(), in_features, raw.shape[1],
                                          None if ids_c is None else ids_c.data_ptr(), n, out.data_ptr(),
                                          _OUT_DTYPES[dtype], torch.get_num_threads())
    if status != 0:
        raise RuntimeError(f"quantized dequantisation failed (type {qtype}, status {status})")
    return out


def _dequantize_reference(qtype: int, raw: torch.Tensor, in_features: int) -> torch.Tensor:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    data = gguf_dequantize(raw.numpy().reshape(1, -1), GGMLQuantizationType(qtype))
    return torch.from_numpy(np.ascontiguousarray(data.reshape(raw.shape[0], in_features)))


# ----------------------------------------------------------------------------- loading

def _state(param: nn.Parameter, in_features: int, out_features: int) -> QuantState:
    state = quantized(param)
    if state is None:
        state = QuantState(in_features, out_features, param.dtype)
        param.quant = state
    return state


def load_shard(param: nn.Parameter, loaded: GGUFTensor, dim: int, start: int, length: int) -> None:
    """A column- or row-parallel weight (or bias) from a GGUF tensor: this rank's rows (dim 0) or
    input features (dim 1). Float tensors and biases load as before."""
    if not loaded.quantized or loaded.raw.dim() != 2:
        part = loaded.raw if loaded.shape[dim] == length else loaded.raw.narrow(dim, start, length)
        param.data = part.to(device=param.device, dtype=param.dtype).contiguous()
        return
    part = loaded.rows(start, length) if dim == 0 else loaded.cols(start, length)
    if part is None:
        name, block, _ = QUANT_TYPES[loaded.qtype]
        log.warning("a %s weight's input features [%d, %d) do not fall on its %d-element blocks: this "
                    "rank's shard is dequantised (more memory); choose a tensor_parallel_size that "
                    "splits the input dimension into whole blocks to keep it quantized",
                    name, start, start + length, block)
        param.data = loaded.narrow(dim, start, length).to(device=param.device, dtype=param.dtype).contiguous()
        return
    rows, cols = part.shape
    state = QuantState(cols, rows, param.dtype, [Segment(0, rows, part.qtype, part.raw.contiguous())])
    param.data = state.segments[0].raw
    param.quant = state


def load_merged_part(param: nn.Parameter, loaded: GGUFTensor, shard_id: int, start: int, length: int,
                     offset: int) -> None:
    """One part (q, k or v; gate or up) of a merged weight: kept until `finalize` joins the parts."""
    if loaded.raw.dim() != 2:  # a bias: float, written in place as before
        part = loaded.raw if loaded.shape[0] == length else loaded.raw.narrow(0, start, length)
        param.data[offset:offset + length].copy_(part.to(param.dtype))
        return
    state = _state(param, loaded.shape[1], param.shape[0])
    state.pending[shard_id] = (offset, loaded.rows(start, length) if loaded.shape[0] != length else loaded)


def load_vocab(param: nn.Parameter, loaded: GGUFTensor, start: int, per: int, vocab_size: int) -> None:
    """The embedding / LM head shard [start, start + per) of the vocabulary, zero rows past its end
    (zero bytes decode to zero in every supported format)."""
    real = max(0, min(per, vocab_size - start))
    part = loaded.rows(start, real) if real != loaded.shape[0] else loaded
    if not loaded.quantized:
        data = torch.zeros((per, loaded.shape[1]), dtype=param.dtype, device=param.device)
        data[:real] = part.raw.to(device=param.device, dtype=param.dtype)
        param.data = data
        return
    raw = torch.zeros((per, part.raw.shape[1]), dtype=torch.uint8)
    raw[:real] = part.raw
    state = QuantState(loaded.shape[1], per, param.dtype, [Segment(0, per, loaded.qtype, raw)])
    param.data = raw
    param.quant = state


def finalize(model: nn.Module) -> int:
    """Join the parts of every merged quantized weight; returns how many weights are quantized."""
    count = 0
    for module in model.modules():
        for _, param in module.named_parameters(recurse=False):
            state = quantized(param)
            if state is None:
                continue
            if state.pending:
                _join_parts(param, state)
            count += 1
    return count


def _join_parts(param: nn.Parameter, state: QuantState) -> None:
    parts = [state.pending[k] for k in sorted(state.pending)]
    state.pending = {}
    if all(not p.quantized for _, p in parts):  # all float: the merged float weight, as before
        param.data = torch.cat([p.raw.to(state.dtype) for _, p in parts]).contiguous()
        del param.quant
        return
    runs: list[list[tuple[int, GGUFTensor]]] = []
    for offset, part in parts:  # consecutive parts of one type become one segment
        if runs and runs[-1][-1][1].qtype == part.qtype:
            runs[-1].append((offset, part))
        else:
            runs.append([(offset, part)])
    segments = []
    for run in runs:
        qtype = run[0][1].qtype
        raws = [p.raw if qtype != FLOAT else p.raw.to(state.dtype) for _, p in run]
        segments.append(Segment(run[0][0], sum(p.shape[0] for _, p in run), qtype, torch.cat(raws).contiguous()))
    state.segments = segments
    set_param_data(param, state)


def set_param_data(param: nn.Parameter, state: QuantState) -> None:
    """The parameter's data: its one segment, or one buffer holding every segment with each segment
    a view into it (so parameters() counts the real bytes)."""
    segments = state.segments
    if len(segments) == 1:
        param.data = segments[0].raw
        return
    flat = torch.cat([s.raw.reshape(-1).view(torch.uint8) for s in segments])
    pos = 0
    for s in segments:
        n = s.raw.numel() * s.raw.element_size()
        s.raw = flat[pos:pos + n].view(s.raw.dtype).view(s.raw.shape)
        pos += n
    param.data = flat


# ----------------------------------------------------------------------------- forward

def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, for float or quantized weights."""
    state = quantized(weight)
    if state is None:
        return F.linear(x, weight, bias)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, state.in_features)
    out = torch.empty(x2.shape[0], state.out_features, dtype=x.dtype)
    lib = quant_native.load()
    activations = rounded = None
    min_rows = dequant_min_rows(x.dtype)
    for seg in state.segments:
        dest = out[:, seg.out_start:seg.out_start + seg.out_rows]
        if seg.qtype == FLOAT:
            dest.copy_(F.linear(x2, seg.raw))
            continue
        if x2.shape[0] >= min_rows:
            # The GEMM gets the same rounded activations the kernel reads, so a row's result does not
            # depend on how many rows share its batch (beyond float rounding).
            if rounded is None:
                rounded = x2 if lib is None else round_activations(lib, x2, x.dtype)
            _dequant_gemm(seg, state.in_features, rounded, dest)
        else:
            if activations is None:
                activations = quantize_activations(lib, x2)
            _kernel_matmul(lib, seg, state.in_features, activations, out, dest)
    if bias is not None:
        out += bias
    return out.reshape(*lead, state.out_features)


def quantize_activations(lib, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    xf = x2.to(torch.float32).contiguous()
    rows, k = xf.shape
    a = torch.empty(rows, k, dtype=torch.int16)
    da = torch.empty(rows, k // 32, dtype=torch.float32)
    sums = torch.empty(rows, k // 16, dtype=torch.float32)
    lib.orcinus_quant_activations(xf.data_ptr(), rows, k, a.data_ptr(), da.data_ptr(), sums.data_ptr())
    return a, da, sums


class _Scratch(threading.local):
    """One reusable buffer per thread for dequantised weights. A fresh tensor per call cost more
    than the dequantisation itself: a large allocation comes from new pages, which the kernel
    zeroes on first touch (the 113 MB LM head: 37 ms with a fresh tensor, 11 ms in tiles)."""

    def __init__(self) -> None:
        self.buffers: dict[torch.dtype, torch.Tensor] = {}

    def get(self, elements: int, dtype: torch.dtype) -> torch.Tensor:
        buf = self.buffers.get(dtype)
        if buf is None or buf.numel() < elements:
            buf = torch.empty(elements, dtype=dtype)
            self.buffers[dtype] = buf
        return buf[:elements]


_scratch = _Scratch()


def round_activations(lib, x2: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`_rounded(quantize_activations(x2))` in one C pass (no integer copy, no torch temporaries)."""
    xf = x2.to(torch.float32).contiguous()
    out = torch.empty_like(xf)
    lib.orcinus_quant_round_activations(xf.data_ptr(), xf.shape[0], xf.shape[1], out.data_ptr())
    return out if dtype not in _OUT_DTYPES else out.to(dtype)


def _dequant_gemm(seg: Segment, in_features: int, x: torch.Tensor, dest: torch.Tensor) -> None:
    """dest = x W^T, W dequantised into a reused scratch buffer: whole when it holds at most
    _DEQUANT_TILE_ELEMENTS, else a tile of output rows at a time (never a whole float copy of,
    e.g., the 113 MB LM head), each tile one GEMM."""
    tile = max(64, _DEQUANT_TILE_ELEMENTS // in_features)
    direct = dest.dtype == x.dtype
    for start in range(0, seg.out_rows, tile):
        stop = min(start + tile, seg.out_rows)
        scratch = _scratch.get((stop - start) * in_features, x.dtype).view(stop - start, in_features)
        w = dequantize(seg.qtype, seg.raw[start:stop], in_features, x.dtype, out=scratch)
        if direct:
            torch.mm(x, w.t(), out=dest[:, start:stop])
        else:
            dest[:, start:stop].copy_(torch.mm(x, w.t()))


def _rounded(activations, dtype: torch.dtype) -> torch.Tensor:
    """The rounded activations back as floats (a * da per block of 32)."""
    a, da, _ = activations
    rows, k = a.shape
    x = (a.view(rows, k // 32, 32).to(torch.float32) * da.unsqueeze(-1)).view(rows, k)
    return x if dtype not in _OUT_DTYPES else x.to(dtype)


def _kernel_matmul(lib, seg: Segment, in_features: int, activations, out: torch.Tensor,
                   dest: torch.Tensor) -> None:
    a, da, sums = activations
    rows = a.shape[0]
    # The kernel writes float32; a float32 output is written in place, else through a buffer.
    direct = out.dtype == torch.float32
    y = dest if direct else torch.empty(rows, seg.out_rows, dtype=torch.float32)
    ldy = out.shape[1] if direct else seg.out_rows
    status = lib.orcinus_quant_matmul(seg.qtype, seg.raw.data_ptr(), seg.out_rows, in_features, seg.raw.shape[1],
                                      a.data_ptr(), da.data_ptr(), sums.data_ptr(), rows, y.data_ptr(), ldy,
                                      torch.get_num_threads())
    if status != 0:
        raise RuntimeError(f"quantized matmul failed (type {seg.qtype}, status {status})")
    if not direct:
        dest.copy_(y)


def embedding(ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.embedding, for float or quantized weights (only the looked-up rows are dequantised)."""
    state = quantized(weight)
    if state is None:
        return F.embedding(ids, weight)
    seg = state.segments[0]
    flat = ids.reshape(-1)
    if seg.qtype == FLOAT:
        rows = F.embedding(flat, seg.raw)
    else:
        dtype = state.dtype if state.dtype in _OUT_DTYPES else torch.float32
        rows = dequantize(seg.qtype, seg.raw, state.in_features, dtype, ids=flat).to(state.dtype)
    return rows.reshape(*ids.shape, state.in_features)


def quantized_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of weights kept quantized, bytes of all parameters)."""
    q = total = 0
    for p in model.parameters():
        n = p.numel() * p.element_size()
        total += n
        if quantized(p) is not None:
            q += n
    return q, total
