"""A fused paged attention backend in Triton: one kernel launch per layer for the whole mixed batch.

Prefill chunks and decodes, variable lengths, GQA and sliding windows go through the same kernel,
which reads keys and values from the block pool in place through the block tables (no gather, no
padding of the activations). The new tokens' keys and values are written once per layer, before
the launch, with the shared vectorised scatter (`write_kv`).

Work split: the flat batch is cut into query tiles of at most BLOCK_M tokens, never crossing a
request boundary; the tile list is built once per iteration on the host (`build`). One program
handles one tile and one KV head, with the GROUP query heads that share that KV head stacked as
rows, so a KV block is read once for the whole group. It walks the request's blocks up to the
tile's last query position (from the window's first block with a sliding window) with an online
softmax in float32.

Triton is optional: `AVAILABLE` says whether it imported; `auto` (orcinus/attention/selector.py)
picks this backend on CUDA only when it did, and naming it without triton is an ImportError. Under `TRITON_INTERPRET=1` (set before this module is imported) the same
kernel runs on CPU tensors, which is how CI checks it against the reference backend.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from orcinus.attention.backend import AttentionBackend, GraphBuffer, graph_common
from orcinus.attention.metadata import AttentionMetadata, BatchLayout, Upload

try:
    import triton
    import triton.language as tl
    AVAILABLE = True
except ImportError:  # orcinus runs without triton; this backend is then not offered
    triton = None
    tl = None
    AVAILABLE = False

MAX_BLOCK_M = 16  # query tokens per tile (prefill chunks); decodes use tiles of 1


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


if AVAILABLE:
    # Triton compiles a variant per value class of each integer argument (== 1, divisible by 16,
    # other). The block-table stride (the widest table of the iteration) and the window change
    # between iterations: left unspecialised, so the kernel compiles once per shape class during
    # warm-up, never again inside a timed run.
    @triton.jit(do_not_specialize=["window", "stride_bt"])
    def _paged_attention_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, out_ptr,
        block_tables_ptr, query_start_ptr, seq_lens_ptr, tile_req_ptr, tile_start_ptr,
        scale, window,
        stride_qt, stride_qh, stride_ot, stride_oh,
        stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
        GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        USE_WINDOW: tl.constexpr, USE_DOT: tl.constexpr,
    ):
        tile = tl.program_id(0)
        kvh = tl.program_id(1)
        req = tl.load(tile_req_ptr + tile).to(tl.int64)
        tstart = tl.load(tile_start_ptr + tile)
        qstart = tl.load(query_start_ptr + req)
        qend = tl.load(query_start_ptr + req + 1)
        seq_len = tl.load(seq_lens_ptr + req)
        ctx_before = seq_len - (qend - qstart)  # the queries are the request's last positions

        # Row r of the tile is query token r // GROUP, query head kvh * GROUP + r % GROUP.
        rows = tl.arange(0, BLOCK_R)
        m = rows // GROUP
        tok = tstart + m
        row_ok = (m < BLOCK_M) & (tok < qend)
        q_pos = ctx_before + (tok - qstart)
        head = kvh * GROUP + rows % GROUP
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        q_mask = row_ok[:, None] & d_ok[None, :]
        q = tl.load(q_ptr + tok.to(tl.int64)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                    mask=q_mask, other=0.0).to(tl.float32)

        m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_R], tl.float32)
        acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)

        last_tok = tl.minimum(tstart + BLOCK_M, qend) - 1
        hi = ctx_before + (last_tok - qstart) + 1  # keys past the tile's last query are never seen
        lo = 0
        if USE_WINDOW:
            lo = tl.maximum(ctx_before + (tstart - qstart) - window + 1, 0)
        n = tl.arange(0, BLOCK_N)
        n_ok = n < BLOCK_SIZE
        kv_mask = n_ok[:, None] & d_ok[None, :]
        for j in range(lo // BLOCK_SIZE, (hi + BLOCK_SIZE - 1) // BLOCK_SIZE):
            blk = tl.load(block_tables_ptr + req * stride_bt + j).to(tl.int64)
            k = tl.load(k_cache_ptr + blk * stride_kb + n[:, None] * stride_ks + kvh * stride_kh + d[None, :],
                        mask=kv_mask, other=0.0).to(tl.float32)
            v = tl.load(v_cache_ptr + blk * stride_vb + n[:, None] * stride_vs + kvh * stride_vh + d[None, :],
                        mask=kv_mask, other=0.0).to(tl.float32)
            if USE_DOT:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:  # shapes below tl.dot's minimum of 16
                s = tl.sum(q[:, None, :] * k[None, :, :], axis=2)
            s = s * scale
            k_pos = j * BLOCK_SIZE + n
            allowed = (k_pos[None, :] <= q_pos[:, None]) & n_ok[None, :]
            if USE_WINDOW:
                allowed = allowed & (k_pos[None, :] > q_pos[:, None] - window)
            s = tl.where(allowed, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if USE_DOT:
                pv = tl.dot(p, v, input_precision="ieee")
            else:
                pv = tl.sum(p[:, :, None] * v[None, :, :], axis=1)
            acc = acc * alpha[:, None] + pv
            m_i = m_new

        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptr + tok.to(tl.int64)[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=q_mask)


@dataclass
class TritonMetadata(AttentionMetadata):
    tile_req: torch.Tensor  # [num_tiles] int32, the request of each query tile
    tile_start: torch.Tensor  # [num_tiles] int32, the tile's first flat token
    block_m: int  # query tokens per tile this iteration (a power of two)


def query_tiles(query_lens: np.ndarray, block_m: int) -> tuple[np.ndarray, np.ndarray]:
    """(request, first flat token) of every tile of at most block_m tokens within one request."""
    starts = np.zeros(len(query_lens), dtype=np.int64)
    np.cumsum(query_lens[:-1], out=starts[1:])
    per_req = -(-query_lens // block_m)
    tile_req = np.repeat(np.arange(len(query_lens)), per_req)
    first_tile = np.repeat(np.cumsum(per_req) - per_req, per_req)
    tile_start = starts[tile_req] + (np.arange(len(tile_req)) - first_tile) * block_m
    return tile_req.astype(np.int32), tile_start.astype(np.int32)


class TritonPagedAttention(AttentionBackend):
    name = "triton"
    # The kernel reads the batch from device tensors only; a decode-only batch of B rows is a grid
    # of B tiles of one token, so the graphs' tile tables are constant (arange).
    capturable = True

    def __init__(self) -> None:
        if not AVAILABLE:
            raise ImportError("the triton attention backend needs the `triton` package (pip install triton)")

    def build(self, layout: BatchLayout, upload: Upload) -> TritonMetadata:
        block_m = min(MAX_BLOCK_M, _next_pow2(int(layout.query_lens.max())))
        tile_req, tile_start = query_tiles(layout.query_lens, block_m)
        return TritonMetadata(**AttentionMetadata.common(layout, upload),
                              tile_req=upload(tile_req), tile_start=upload(tile_start), block_m=block_m)

    def graph_buffers(self) -> list[GraphBuffer]:
        return [GraphBuffer("tile_req", np.int32), GraphBuffer("tile_start", np.int32)]

    def graph_metadata(self, static, rows, seq_lens, block_size) -> TritonMetadata:
        return TritonMetadata(**graph_common(static, rows, seq_lens, block_size), tile_req=static["tile_req"][:rows],
                              tile_start=static["tile_start"][:rows], block_m=1)

    def attend(self, q, k_cache, v_cache, meta: TritonMetadata, scale, sliding_window=None):
        num_tokens, num_heads, head_dim = q.shape
        num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
        if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1 or q.stride(-1) != 1:
            raise ValueError("the triton backend needs the head dimension contiguous")
        group = num_heads // num_kv_heads
        out = torch.empty_like(q)
        block_r = max(16, _next_pow2(meta.block_m * group))
        block_n = _next_pow2(block_size)
        block_d = max(16, _next_pow2(head_dim))
        use_dot = block_n >= 16  # rows and head dim are padded to 16 already
        grid = (int(meta.tile_req.shape[0]), num_kv_heads)
        _paged_attention_kernel[grid](
            q, k_cache, v_cache, out,
            meta.block_tables, meta.query_start_loc, meta.seq_lens, meta.tile_req, meta.tile_start,
            float(scale), int(sliding_window or 0),
            q.stride(0), q.stride(1), out.stride(0), out.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), meta.block_tables.stride(0),
            GROUP=group, BLOCK_M=meta.block_m, BLOCK_R=block_r, BLOCK_SIZE=block_size, BLOCK_N=block_n,
            HEAD_DIM=head_dim, BLOCK_D=block_d, USE_WINDOW=sliding_window is not None, USE_DOT=use_dot,
        )
        return out
