"""A batched backend in plain PyTorch: all increment requests of an iteration in one attention call.

Increment (decode) requests bring one query each; their contexts are gathered from the block pool
with one index tensor built once per iteration (shared by every layer) and attended in a single
`scaled_dot_product_attention` call, with a key mask for the differing context lengths. The
activations stay flat and unpadded; only the gathered keys inside this call are ragged-to-dense.
Initiation (prefill) requests, few per iteration, attend one by one as in the reference backend.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from orcinus.attention.backend import AttentionBackend
from orcinus.attention.metadata import AttentionMetadata
from orcinus.attention.reference import attend_one


@dataclass
class _DecodePlan:
    token_index: torch.Tensor  # [Bd] flat positions of the decode queries
    slot_index: torch.Tensor  # [Bd, maxL] flat KV slots of each decode request's context
    key_mask: torch.Tensor  # [Bd, 1, 1, maxL] True where a key is real
    seq_lens: torch.Tensor  # [Bd]
    prefill: list[tuple[int, int, int, int]]  # (request index, query start, query len, seq len)
    all_decode: bool


def _plan(meta: AttentionMetadata, device: torch.device) -> _DecodePlan:
    plan = meta.cache.get("batched")
    if plan is not None:
        return plan
    q_lens = meta.query_lens_host
    starts = [0]
    for n in q_lens:
        starts.append(starts[-1] + n)
    decode = [i for i, n in enumerate(q_lens) if n == 1]
    prefill = [(i, starts[i], q_lens[i], meta.seq_lens_host[i]) for i, n in enumerate(q_lens) if n != 1]
    if decode:
        idx = torch.tensor(decode, device=device)
        seq = meta.seq_lens.index_select(0, idx).long()
        max_len = max(meta.seq_lens_host[i] for i in decode)
        pos = torch.arange(max_len, device=device)
        bs = meta.block_size
        tables = meta.block_tables.index_select(0, idx).long()
        blocks = tables.gather(1, (pos // bs).clamp(max=tables.shape[1] - 1).expand(len(decode), -1))
        slots = blocks * bs + pos % bs
        valid = pos[None, :] < seq[:, None]
        slots = torch.where(valid, slots, torch.zeros_like(slots))
        token_index = torch.tensor([starts[i] for i in decode], device=device)
        plan = _DecodePlan(token_index, slots, valid[:, None, None, :], seq, prefill, not prefill)
    else:
        empty = torch.empty(0, dtype=torch.long, device=device)
        plan = _DecodePlan(empty, empty, empty, empty, prefill, False)
    meta.cache["batched"] = plan
    return plan


class BatchedAttention(AttentionBackend):
    name = "batched"

    def attend(self, q, k_cache, v_cache, meta: AttentionMetadata, scale, sliding_window=None):
        plan = _plan(meta, q.device)
        num_heads, num_kv_heads, head_dim = q.shape[1], k_cache.shape[2], k_cache.shape[3]
        out = q.new_empty(q.shape) if not plan.all_decode else None
        if plan.token_index.numel():
            qd = q.index_select(0, plan.token_index)[:, :, None, :]  # [Bd, Hq, 1, D]
            kf = k_cache.view(-1, num_kv_heads, head_dim)
            vf = v_cache.view(-1, num_kv_heads, head_dim)
            flat = plan.slot_index.view(-1)  # index_select is several times faster than fancy indexing
            shape = (*plan.slot_index.shape, num_kv_heads, head_dim)
            kd = kf.index_select(0, flat).view(shape).transpose(1, 2).to(q.dtype)  # [Bd, Hkv, maxL, D]
            vd = vf.index_select(0, flat).view(shape).transpose(1, 2).to(q.dtype)
            mask = plan.key_mask
            if sliding_window is not None:
                pos = torch.arange(mask.shape[-1], device=q.device)
                mask = mask & (pos[None, None, None, :] > (plan.seq_lens - 1 - sliding_window)[:, None, None, None])
            od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, scale=scale,
                                                enable_gqa=num_heads != num_kv_heads)[:, :, 0, :]
            if plan.all_decode:
                return od
            out.index_copy_(0, plan.token_index, od)
        for i, start, qlen, slen in plan.prefill:
            out[start:start + qlen] = attend_one(q[start:start + qlen], k_cache, v_cache, meta.block_tables[i],
                                                 slen, scale, sliding_window)
        return out
