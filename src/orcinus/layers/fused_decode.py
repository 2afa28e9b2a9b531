"""An iteration through the decoder layers in one C call (`decode_layers.c`), on CPU.

A Llama-family stage whose linears are kept in GGUF blocks runs its layers in C, for any batch of
decodes and prompt chunks: the same quantized-matmul and paged-attention kernels the module path
calls, without the ~25 PyTorch ops per layer around them (norms, rotary, KV write, residuals). On
two cores of an Intel Xeon that dispatch was ~9 of a single user's ~19 ms per token
(docs/benchmarks.md, "A decode step in one call"); for prompt-sized batches the same ops also
allocated [rows, 3072] temporaries per op, whose pages the kernel zeroed every time. The C call
works in one scratch buffer that the plan keeps and grows to the largest batch seen.

`decode(model, x, positions, ctx)` returns the layers' output, or None when this batch or model
must take the module path, which stays the reference (and what tests compare this path with):
- the model: pre-norm decoder layers with RMSNorm, rotary self-attention (optional q/k norms and
  q/k/v bias, sliding windows) and a SiLU gated MLP, every linear quantized (up to 4 runs of
  types), float32, no tensor parallelism (the module path's all-reduces sit between the ops);
- the batch: float32 on CPU, at most `max_rows()` rows (those for which the module path would also
  run the integer kernel, so a row's numbers do not depend on which path its batch took), its
  decodes and prompt chunks in the CPU paged backend's C kernels, contiguous float32 or float16
  caches;
- nothing but the executor's progress beat hooks a layer (a forward hook or a profiler would
  otherwise see no call; the beat is given once per step), and
  `ORCINUS_FUSED_DECODE=0` is not set (the switch for comparing the two paths).
"""
from __future__ import annotations

import ctypes
import logging
import os
import threading
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from orcinus.attention import native
from orcinus.attention.paged_cpu import PagedCpuMetadata
from orcinus.distributed.parallel_state import tensor_parallel
from orcinus.layers import quant_native
from orcinus.layers import quantized_linear as quant
from orcinus.layers.context import ForwardContext
from orcinus.layers.decoder_layer import DecoderLayer
from orcinus.layers.mlp import GatedMLP
from orcinus.layers.norms import RMSNorm
from orcinus.layers.self_attention import SelfAttention

log = logging.getLogger("orcinus")

SOURCE = Path(__file__).with_name("decode_layers.c")
ENV_SWITCH = "ORCINUS_FUSED_DECODE"
MAX_SEGMENTS = 4
_i64, _p, _f64 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_double
# Batches of up to `max_rows()` rows take the fused step: those for which the module path would
# also run the integer kernel (quantized_linear.dequant_min_rows), so a row's numbers do not depend
# on which path its batch took; at most ROWS_CAP, which bounds the scratch the plan keeps (~30 KB a
# row for the default model: 120 MB at 4096 rows, twice the default token budget).
ROWS_CAP = 4096


def max_rows() -> int:
    return min(quant.dequant_min_rows(torch.float32) - 1, ROWS_CAP)


class DecodeLinear(ctypes.Structure):
    _fields_ = [("num_segments", _i64), ("in_features", _i64), ("out_features", _i64),
                ("type", _i64 * MAX_SEGMENTS), ("out_start", _i64 * MAX_SEGMENTS),
                ("out_rows", _i64 * MAX_SEGMENTS), ("row_bytes", _i64 * MAX_SEGMENTS),
                ("raw", _p * MAX_SEGMENTS), ("bias", _p)]


class DecodeLayer(ctypes.Structure):
    _fields_ = [("input_norm", _p), ("post_norm", _p), ("q_norm", _p), ("k_norm", _p),
                ("k_cache", _p), ("v_cache", _p), ("window", _i64), ("norm_eps", _f64), ("qk_norm_eps", _f64),
                ("qkv", DecodeLinear), ("o", DecodeLinear), ("gate_up", DecodeLinear), ("down", DecodeLinear)]


class DecodeModel(ctypes.Structure):
    _fields_ = [("hidden", _i64), ("num_heads", _i64), ("num_kv_heads", _i64), ("head_dim", _i64),
                ("intermediate", _i64), ("block_size", _i64), ("kv_dtype", _i64), ("scale", _f64),
                ("cos", _p), ("sin", _p),
                ("quant_activations", _p), ("quant_matmul", _p), ("paged_decode", _p), ("paged_prefill", _p)]


class BatchRequests(ctypes.Structure):
    """The iteration's decodes and prompt chunks (attention/paged_cpu.py's host arrays)."""
    _fields_ = [("num_decodes", _i64), ("decode_rows", _p), ("decode_seq_lens", _p), ("decode_table", _p),
                ("decode_table_stride", _i64), ("num_chunks", _i64), ("chunk_starts", _p), ("chunk_lens", _p),
                ("chunk_seq_lens", _p), ("chunk_table", _p), ("chunk_table_stride", _i64)]


# The pools the C step writes (float32, or float16 with kv_cache_dtype=float16; a bfloat16 pool
# beside float32 activations takes the module path).
FUSED_KV_DTYPES = (torch.float32, torch.float16)

_lock = threading.Lock()
_lib: dict[str, ctypes.CDLL | None] = {}


def _load() -> ctypes.CDLL | None:
    """This file's C library, or None."""
    with _lock:
        if "lib" not in _lib:
            lib = None
            compiler = native._compiler()
            if compiler is not None:
                for openmp in (True, False):  # its element-wise loops on torch's team where it builds
                    try:
                        lib = ctypes.CDLL(str(native.build_shared_object(SOURCE, compiler, openmp=openmp)))
                        lib.orcinus_decode_layers.restype = ctypes.c_int
                        lib.orcinus_decode_layers.argtypes = [_p, _p, _i64, _p, _i64, _p, _p, _p, _p, _i64,
                                                              ctypes.c_int]
                        lib.orcinus_decode_layers_scratch_bytes.restype = _i64
                        lib.orcinus_decode_layers_scratch_bytes.argtypes = [_p, _i64]
                        break
                    except (OSError, RuntimeError) as exc:
                        log.info("fused decode: %s build failed (%s)", "OpenMP" if openmp else "serial", exc)
                        lib = None
            _lib["lib"] = lib
        return _lib["lib"]


def _linear(module: nn.Module) -> DecodeLinear | None:
    state = quant.quantized(module.weight)
    if state is None or state.pending or not 0 < len(state.segments) <= MAX_SEGMENTS:
        return None
    if any((s.qtype not in quant.QUANT_TYPES and s.qtype not in quant.PACKED_TYPES) or not s.raw.is_contiguous()
           for s in state.segments):
        return None
    bias = getattr(module, "bias", None)
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
        return None
    lin = DecodeLinear(num_segments=len(state.segments), in_features=state.in_features,
                       out_features=state.out_features, bias=None if bias is None else bias.data_ptr())
    for i, s in enumerate(state.segments):
        lin.type[i], lin.out_start[i], lin.out_rows[i] = s.qtype, s.out_start, s.out_rows
        lin.row_bytes[i], lin.raw[i] = s.raw.shape[1], s.raw.data_ptr()
    return lin


class _Plan:
    """The packed structs of one model's stage (built once; cache pointers refreshed when they move)."""

    def __init__(self, layers: nn.ModuleList, lib: ctypes.CDLL, model: DecodeModel, packed: list[DecodeLayer],
                 keep: list[object]) -> None:
        self.layers = layers
        self.lib = lib
        self.model = model
        self.array = (DecodeLayer * len(packed))(*packed)
        self.keep = keep  # tensors whose pointers the structs hold
        self.cache_ptrs: tuple[int, ...] = ()
        self.scratch = torch.empty(0, dtype=torch.uint8)  # grown to the largest batch seen

    def scratch_for(self, rows: int) -> torch.Tensor:
        need = self.lib.orcinus_decode_layers_scratch_bytes(ctypes.addressof(self.model), rows)
        if self.scratch.numel() < need:
            self.scratch = torch.empty(need, dtype=torch.uint8)
        return self.scratch

    def bind_caches(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> bool:
        ptrs = tuple(t.data_ptr() for pair in kv_caches for t in pair)
        if ptrs != self.cache_ptrs:
            for layer, module in zip(self.array, self.layers):
                k, v = kv_caches[module.self_attn.attn.kv_index]
                if not (k.dtype == v.dtype and k.dtype in FUSED_KV_DTYPES and k.is_contiguous() and v.is_contiguous()):
                    return False
                layer.k_cache, layer.v_cache = k.data_ptr(), v.data_ptr()
            self.model.kv_dtype = native.KV_DTYPE_CODES[kv_caches[0][0].dtype]  # one dtype for the whole pool
            self.cache_ptrs = ptrs
        return True


def _build_plan(layers: nn.ModuleList) -> _Plan | None:
    if os.environ.get(ENV_SWITCH, "1") == "0" or tensor_parallel().size != 1 or len(layers) == 0:
        return None
    qlib, alib = quant_native.load(), native.load()
    lib = _load() if qlib is not None and alib is not None else None
    if lib is None:
        return None
    packed: list[DecodeLayer] = []
    keep: list[object] = []
    first = layers[0]
    if not isinstance(first, DecoderLayer) or not isinstance(first.self_attn, SelfAttention):
        return None
    attn0 = first.self_attn
    rotary = attn0.rotary[0] if attn0.rotary is not None else None
    if rotary is None or rotary.cos.dtype != torch.float32 or not rotary.cos.is_contiguous():
        return None
    for layer in layers:
        if not (isinstance(layer, DecoderLayer) and layer.pre_norm and isinstance(layer.self_attn, SelfAttention)
                and isinstance(layer.mlp, GatedMLP) and layer.mlp.act is F.silu
                and isinstance(layer.input_layernorm, RMSNorm) and isinstance(layer.post_attention_layernorm, RMSNorm)
                and layer.input_layernorm.eps == layer.post_attention_layernorm.eps):
            return None
        sa, pa = layer.self_attn, layer.self_attn.attn
        if sa.rotary is None or sa.rotary[0] is not rotary:
            return None
        if (pa.num_heads, pa.num_kv_heads, pa.head_dim, pa.scale) != (attn0.attn.num_heads, attn0.attn.num_kv_heads,
                                                                      attn0.attn.head_dim, attn0.attn.scale):
            return None
        linears = [_linear(m) for m in (sa.qkv_proj, sa.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj)]
        if any(lin is None for lin in linears):
            return None
        norms = [layer.input_layernorm.weight, layer.post_attention_layernorm.weight]
        if sa.qk_norm:
            norms += [sa.q_norm.weight, sa.k_norm.weight]
        if any(w.dtype != torch.float32 or not w.is_contiguous() for w in norms):
            return None
        keep += norms
        packed.append(DecodeLayer(
            input_norm=norms[0].data_ptr(), post_norm=norms[1].data_ptr(),
            q_norm=norms[2].data_ptr() if sa.qk_norm else None, k_norm=norms[3].data_ptr() if sa.qk_norm else None,
            window=pa.sliding_window or 0, norm_eps=layer.input_layernorm.eps,
            qk_norm_eps=sa.q_norm.eps if sa.qk_norm else 0.0,
            qkv=linears[0], o=linears[1], gate_up=linears[2], down=linears[3]))
    a = attn0.attn
    hidden = first.input_layernorm.weight.shape[0]
    intermediate = first.mlp.down_proj.weight.quant.in_features
    fn = lambda f: ctypes.cast(f, ctypes.c_void_p).value  # noqa: E731 - a C function's address
    model = DecodeModel(hidden=hidden, num_heads=a.num_heads, num_kv_heads=a.num_kv_heads, head_dim=a.head_dim,
                        intermediate=intermediate, block_size=0, scale=a.scale, cos=rotary.cos.data_ptr(),
                        sin=rotary.sin.data_ptr(), quant_activations=fn(qlib.orcinus_quant_activations),
                        quant_matmul=fn(qlib.orcinus_quant_matmul), paged_decode=fn(alib.orcinus_paged_decode),
                        paged_prefill=fn(alib.orcinus_paged_prefill))
    keep += [rotary.cos, rotary.sin]
    return _Plan(layers, lib, model, packed, keep)


_NO_PLAN = object()


def _hooked(layers: nn.ModuleList) -> bool:
    """Whether anything but the executor's progress beat (executor/progress.py) hooks a layer."""
    from torch.nn.modules import module as torch_module

    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return True
    return any(m._forward_pre_hooks or any(not getattr(h, "progress_beat", False) for h in m._forward_hooks.values())
               for m in layers)


def _beat(layers: nn.ModuleList, out: torch.Tensor) -> None:
    """The progress beat the last layer's hook would have given (one for the whole step)."""
    last = layers[len(layers) - 1]
    for h in list(last._forward_hooks.values()):
        h(last, (), out)


def prepare(model: nn.Module) -> bool:
    """Build the plan of a loaded model now (compiling the C file if needed), at start-up rather
    than in the first decode; True when its decodes can take the fused step."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        return False
    plan = getattr(model, "_fused_decode_plan", None)
    if plan is None:
        plan = _build_plan(layers) or _NO_PLAN
        model._fused_decode_plan = plan
    return plan is not _NO_PLAN


def decode(owner: nn.Module, layers: nn.ModuleList, x: torch.Tensor, positions: torch.Tensor,
           ctx: ForwardContext) -> torch.Tensor | None:
    """The layers' output for a batch of decodes and prompt chunks in one C call, or None (take the
    module path). `owner` keeps the plan (the model: its layers and weights do not change after loading)."""
    meta = ctx.meta
    rows = x.shape[0]
    if not (isinstance(meta, PagedCpuMetadata) and meta.native is not None and x.dtype == torch.float32
            and x.device.type == "cpu" and x.dim() == 2 and 0 < rows <= max_rows()):
        return None
    nat = meta.native
    chunks = nat.prefills
    if len(nat.rows) + (0 if chunks is None else int(chunks.query_lens.sum())) != rows:
        return None
    plan = getattr(owner, "_fused_decode_plan", None)
    if plan is None:
        prepare(owner)
        plan = owner._fused_decode_plan
    if plan is _NO_PLAN or _hooked(layers) or not plan.bind_caches(ctx.kv_caches):
        return None
    plan.model.block_size = meta.block_size
    out = x.contiguous().clone()
    pos = positions.to(torch.int64).contiguous()
    slots = meta.slot_mapping.to(torch.int64).contiguous()
    batch = BatchRequests(num_decodes=len(nat.rows), decode_rows=nat.rows.ctypes.data,
                          decode_seq_lens=nat.seq_lens.ctypes.data, decode_table=nat.table.ctypes.data,
                          decode_table_stride=nat.table.shape[1])
    if chunks is not None:
        batch.num_chunks, batch.chunk_table_stride = len(chunks.query_lens), chunks.table.shape[1]
        batch.chunk_starts, batch.chunk_lens = chunks.query_starts.ctypes.data, chunks.query_lens.ctypes.data
        batch.chunk_seq_lens, batch.chunk_table = chunks.seq_lens.ctypes.data, chunks.table.ctypes.data
    scratch = plan.scratch_for(rows)
    status = plan.lib.orcinus_decode_layers(
        ctypes.addressof(plan.model), ctypes.addressof(plan.array), len(plan.array), out.data_ptr(), rows,
        pos.data_ptr(), slots.data_ptr(), ctypes.addressof(batch), scratch.data_ptr(), scratch.numel(),
        torch.get_num_threads())
    if status != 0:
        raise RuntimeError(f"fused layer step failed (status {status}: scratch too small or a kernel refused its input)")
    _beat(layers, out)
    return out
