"""A batched backend in plain PyTorch: all increment requests of an iteration in one attention call.

Increment (decode) requests bring one query each; their contexts are gathered from the block pool
with one index tensor built once per iteration (in `build`, on the host, shared by every layer)
and attended in a single `scaled_dot_product_attention` call, with a key mask for the differing
context lengths. The activations stay flat and unpadded; only the gathered keys inside this call
are ragged-to-dense. Initiation (prefill) requests, few per iteration, attend one by one as in the
reference backend.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from orcinus.attention.backend import AttentionBackend
from orcinus.attention.metadata import AttentionMetadata, BatchLayout, Upload
from orcinus.attention.reference import attend_one


@dataclass
class BatchedMetadata(AttentionMetadata):
    decode_token_index: torch.Tensor  # [Bd] flat positions of the decode queries
    decode_slots: torch.Tensor  # [Bd, maxL] flat KV slots of each decode request's context
    decode_key_mask: torch.Tensor  # [Bd, 1, 1, maxL] True where a key is real
    decode_seq_lens: torch.Tensor  # [Bd]
    prefill: list[tuple[int, int, int, int]]  # (request index, query start, query len, seq len)
    all_decode: bool


class BatchedAttention(AttentionBackend):
    name = "batched"

    def build(self, layout: BatchLayout, upload: Upload) -> BatchedMetadata:
        q_lens, seq_lens, bs = layout.query_lens, layout.seq_lens, layout.block_size
        starts = layout.query_start_loc[:-1]
        decode = np.flatnonzero(q_lens == 1)
        prefill = [(int(i), int(starts[i]), int(q_lens[i]), int(seq_lens[i])) for i in np.flatnonzero(q_lens != 1)]
        seq = seq_lens[decode]
        max_len = int(seq.max()) if len(decode) else 0
        pos = np.arange(max_len)
        tables = layout.block_table[decode]
        blocks = np.take_along_axis(tables, np.minimum(pos // bs, tables.shape[1] - 1)[None, :].repeat(len(decode), 0),
                                    axis=1) if len(decode) else np.zeros((0, 0), dtype=np.int64)
        valid = pos[None, :] < seq[:, None]
        slots = np.where(valid, blocks * bs + pos % bs, 0)
        return BatchedMetadata(
            **AttentionMetadata.common(layout, upload),
            decode_token_index=upload(starts[decode]),
            decode_slots=upload(slots.astype(np.int64)),
            decode_key_mask=upload(valid[:, None, None, :]),
            decode_seq_lens=upload(seq.astype(np.int64)),
            prefill=prefill,
            all_decode=not prefill,
        )

    def attend(self, q, k_cache, v_cache, meta: BatchedMetadata, scale, sliding_window=None):
        num_heads, num_kv_heads, head_dim = q.shape[1], k_cache.shape[2], k_cache.shape[3]
        out = q.new_empty(q.shape) if not meta.all_decode else None
        if meta.decode_token_index.numel():
            qd = q.index_select(0, meta.decode_token_index)[:, :, None, :]  # [Bd, Hq, 1, D]
            kf = k_cache.view(-1, num_kv_heads, head_dim)
            vf = v_cache.view(-1, num_kv_heads, head_dim)
            flat = meta.decode_slots.view(-1)  # index_select is several times faster than fancy indexing
            shape = (*meta.decode_slots.shape, num_kv_heads, head_dim)
            kd = kf.index_select(0, flat).view(shape).transpose(1, 2).to(q.dtype)  # [Bd, Hkv, maxL, D]
            vd = vf.index_select(0, flat).view(shape).transpose(1, 2).to(q.dtype)
            mask = meta.decode_key_mask
            if sliding_window is not None:
                pos = torch.arange(mask.shape[-1], device=q.device)
                first = (meta.decode_seq_lens - 1 - sliding_window)[:, None, None, None]
                mask = mask & (pos[None, None, None, :] > first)
            od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, scale=scale,
                                                enable_gqa=num_heads != num_kv_heads)[:, :, 0, :]
            if meta.all_decode:
                return od
            out.index_copy_(0, meta.decode_token_index, od)
        for i, start, qlen, slen in meta.prefill:
            out[start:start + qlen] = attend_one(q[start:start + qlen], k_cache, v_cache, meta.block_tables[i],
                                                 slen, scale, sliding_window)
        return out
