"""The CPU backend: each request attends over its own blocks of the pool, read in place where the
blocks are consecutive.

Measured on CPU (orcinus/bench/attention_micro.py, docs/benchmarks.md "Speed"), a batched SDPA over
a padded, gathered copy of every decode context loses to per-request attention: the per-slot
gather, the padding, the key mask and the GQA expansion cost more than one small SDPA call per
request. This backend keeps per-request calls and removes their overheads:

- `build` (once per iteration, on the host) finds each request's block run: when its blocks are
  consecutive in the pool (a prompt's blocks usually are) the context is a view of the pool, no
  copy; otherwise one index_select of whole blocks (never of single slots).
- A decode's query heads of one KV group become rows of one [G, D] query, so GQA needs no
  expanded keys and no mask; a sliding window is a slice of the keys, not a mask.
- Prefill chunks use the causal (and window) mask like the reference backend; a whole prompt
  that no window cuts uses SDPA's `is_causal` instead (no mask built).
- Where the C kernels build (`native.py`, `paged_attention.c` and `paged_prefill.h`), all decodes
  of a layer are one call to one kernel and all prompt chunks one call to another, instead of one
  SDPA each: the per-request Python and tensor-op overhead (~15 small ops per request per layer) was most of decode
  attention's time, and PyTorch's flash kernel ran the short prompts of a serving batch at ~30
  GFLOP/s on two cores.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from orcinus.attention import native
from orcinus.attention.backend import AttentionBackend
from orcinus.attention.metadata import AttentionMetadata, BatchLayout, Upload
from orcinus.attention.reference import causal_mask


@dataclass
class RequestBlocks:
    query_start: int
    query_len: int
    seq_len: int
    first_block: int  # valid when ids is None: the context is blocks [first_block, first_block + n)
    num_blocks: int
    ids: torch.Tensor | None  # block ids when they are not consecutive


@dataclass
class NativePrefills:
    """The iteration's prompt chunks as the C prefill kernel takes them (host arrays)."""

    query_starts: np.ndarray  # [n] int64 first row of each chunk in the flat batch
    query_lens: np.ndarray  # [n] int64
    seq_lens: np.ndarray  # [n] int64 context after the chunk
    table: np.ndarray  # [n, max_blocks] int64, C-contiguous


@dataclass
class NativeBatch:
    """The iteration's requests as the C kernels take them (host arrays, alive as long as this):
    its decodes for the decode kernel, its prompt chunks for the prefill kernel."""

    lib: ctypes.CDLL  # the loaded kernels, looked up once per iteration rather than once per layer
    rows: np.ndarray  # [n] int64 query row of each decode
    seq_lens: np.ndarray  # [n] int64
    table: np.ndarray  # [n, max_blocks] int64, C-contiguous
    prefills: NativePrefills | None = None  # the prompt chunks; None when there are none


@dataclass
class PagedCpuMetadata(AttentionMetadata):
    requests: list[RequestBlocks]
    native: NativeBatch | None = None


class PagedCpuAttention(AttentionBackend):
    name = "paged"

    def warm_up(self, device: torch.device) -> None:
        # Compile (or find in the cache) the C decode kernel now, at start-up, rather than inside
        # the first iteration that has a decode in it.
        if device.type == "cpu":
            native.load()

    def build(self, layout: BatchLayout, upload: Upload) -> PagedCpuMetadata:
        bs, table = layout.block_size, layout.block_table
        nblocks = -(-layout.seq_lens // bs)
        cols = np.arange(table.shape[1] - 1)
        step_ok = (np.diff(table, axis=1) == 1) | (cols[None, :] >= nblocks[:, None] - 1)
        consecutive = step_ok.all(axis=1) if table.shape[1] > 1 else np.ones(len(table), dtype=bool)
        starts = layout.query_start_loc
        requests = []
        for i, (ql, sl, n, run) in enumerate(zip(layout.query_lens.tolist(), layout.seq_lens.tolist(),
                                                 nblocks.tolist(), consecutive.tolist())):
            ids = None if run else upload(np.ascontiguousarray(table[i, :n]))
            requests.append(RequestBlocks(int(starts[i]), ql, sl, int(table[i, 0]), n, ids))
        return PagedCpuMetadata(**AttentionMetadata.common(layout, upload), requests=requests,
                                native=self._native_batch(layout))

    @staticmethod
    def _native_batch(layout: BatchLayout) -> NativeBatch | None:
        lib = native.load()
        if lib is None:
            return None
        decode = layout.query_lens == 1
        chunk = ~decode
        prefills = None
        if chunk.any():
            prefills = NativePrefills(
                query_starts=np.ascontiguousarray(layout.query_start_loc[:-1][chunk], dtype=np.int64),
                query_lens=np.ascontiguousarray(layout.query_lens[chunk], dtype=np.int64),
                seq_lens=np.ascontiguousarray(layout.seq_lens[chunk], dtype=np.int64),
                table=np.ascontiguousarray(layout.block_table[chunk], dtype=np.int64))
        return NativeBatch(lib=lib, rows=np.ascontiguousarray(layout.query_start_loc[:-1][decode], dtype=np.int64),
                           seq_lens=np.ascontiguousarray(layout.seq_lens[decode], dtype=np.int64),
                           table=np.ascontiguousarray(layout.block_table[decode], dtype=np.int64),
                           prefills=prefills)

    def attend(self, q, k_cache, v_cache, meta: PagedCpuMetadata, scale, sliding_window=None):
        num_heads, num_kv_heads, head_dim = q.shape[1], k_cache.shape[2], k_cache.shape[3]
        group = num_heads // num_kv_heads
        out = q.new_empty(q.shape)
        requests = meta.requests
        if meta.native is not None and _native_fits(q, k_cache, v_cache):
            _native_decode(q, k_cache, v_cache, out, meta.native, scale, sliding_window)
            _native_prefill(q, k_cache, v_cache, out, meta.native, scale, sliding_window)
            requests = []
        for r in requests:
            if r.ids is None:
                kb, vb = k_cache.narrow(0, r.first_block, r.num_blocks), v_cache.narrow(0, r.first_block, r.num_blocks)
            else:
                kb, vb = k_cache.index_select(0, r.ids), v_cache.index_select(0, r.ids)
            k = kb.view(-1, num_kv_heads, head_dim)[:r.seq_len]
            v = vb.view(-1, num_kv_heads, head_dim)[:r.seq_len]
            qr = q[r.query_start:r.query_start + r.query_len]
            if r.query_len == 1:
                if sliding_window is not None and r.seq_len > sliding_window:
                    k, v = k[r.seq_len - sliding_window:], v[r.seq_len - sliding_window:]
                # [Hkv, G, D] queries over [Hkv, L, D] keys: GQA without expanding the keys
                o = F.scaled_dot_product_attention(qr.view(1, num_kv_heads, group, head_dim),
                                                   k.transpose(0, 1)[None].to(q.dtype),
                                                   v.transpose(0, 1)[None].to(q.dtype), scale=scale)
                out[r.query_start] = o.reshape(num_heads, head_dim)
            else:
                # A whole prompt that no window cuts is plain causal attention: SDPA's is_causal path
                # builds no mask and ran 13-38 % faster (64-1024 tokens, one core).
                fresh = r.query_len == r.seq_len and (sliding_window is None or r.seq_len <= sliding_window)
                mask = None if fresh else causal_mask(r.query_len, r.seq_len, sliding_window, q.device)
                o = F.scaled_dot_product_attention(qr.transpose(0, 1)[None], k.transpose(0, 1)[None].to(q.dtype),
                                                   v.transpose(0, 1)[None].to(q.dtype), attn_mask=mask, scale=scale,
                                                   is_causal=fresh, enable_gqa=group != 1)
                out[r.query_start:r.query_start + r.query_len] = o[0].transpose(0, 1)
        return out


def _native_fits(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """The C kernels take float32 or bfloat16 queries, a float32, bfloat16 or float16 pool (keys and
    values alike), CPU tensors with heads contiguous."""
    return (q.device.type == "cpu" and q.dtype in native.DTYPE_CODES and k_cache.dtype in native.KV_DTYPE_CODES
            and k_cache.dtype == v_cache.dtype and k_cache.is_contiguous()
            and v_cache.is_contiguous() and q.stride(2) == 1 and q.stride(1) == q.shape[2])


def _native_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
                   decodes: NativeBatch, scale: float, sliding_window: int | None) -> None:
    if len(decodes.rows) == 0:
        return
    status = decodes.lib.orcinus_paged_decode(
        q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr(),
        decodes.table.ctypes.data, decodes.table.shape[1], decodes.rows.ctypes.data,
        decodes.seq_lens.ctypes.data, len(decodes.rows), q.shape[1], k_cache.shape[2], q.shape[2],
        k_cache.shape[1], sliding_window or 0, scale, native.DTYPE_CODES[q.dtype],
        native.KV_DTYPE_CODES[k_cache.dtype], torch.get_num_threads())
    if status != 0:
        raise MemoryError("CPU decode attention could not allocate its scratch buffer")


def _native_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
                    batch: NativeBatch, scale: float, sliding_window: int | None) -> None:
    p = batch.prefills
    if p is None:
        return
    status = batch.lib.orcinus_paged_prefill(
        q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr(),
        p.table.ctypes.data, p.table.shape[1], p.query_starts.ctypes.data, p.query_lens.ctypes.data,
        p.seq_lens.ctypes.data, len(p.query_lens), q.shape[1], k_cache.shape[2], q.shape[2], k_cache.shape[1],
        sliding_window or 0, scale, native.DTYPE_CODES[q.dtype], native.KV_DTYPE_CODES[k_cache.dtype],
        torch.get_num_threads())
    if status != 0:
        raise MemoryError("CPU prefill attention could not allocate its scratch buffer")
