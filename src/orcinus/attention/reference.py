"""The reference backend: the paper's split / per-request attention / merge, in plain PyTorch.

Readable, runs on any device, and the oracle the faster backends are tested against."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from orcinus.attention.backend import AttentionBackend
from orcinus.attention.metadata import AttentionMetadata


def causal_mask(query_len: int, seq_len: int, sliding_window: int | None, device: torch.device) -> torch.Tensor | None:
    """Boolean [query_len, seq_len] mask (True = may attend) for queries at the last positions."""
    if sliding_window is None and query_len == 1:
        return None
    q_pos = torch.arange(seq_len - query_len, seq_len, device=device)[:, None]
    k_pos = torch.arange(seq_len, device=device)[None, :]
    allowed = k_pos <= q_pos
    if sliding_window is not None:
        allowed &= k_pos > q_pos - sliding_window
    return allowed


def gather_context(cache: torch.Tensor, block_table_row: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The first seq_len slots of one request as [seq_len, H, D]."""
    block_size = cache.shape[1]
    num_blocks = -(-seq_len // block_size)
    blocks = cache.index_select(0, block_table_row[:num_blocks])
    return blocks.reshape(-1, cache.shape[2], cache.shape[3])[:seq_len]


def attend_one(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table_row: torch.Tensor,
               seq_len: int, scale: float, sliding_window: int | None) -> torch.Tensor:
    """One request's queries [qlen, Hq, D] (its last qlen positions) over its own context."""
    qlen, num_heads = q.shape[0], q.shape[1]
    k = gather_context(k_cache, block_table_row, seq_len).transpose(0, 1).to(q.dtype)  # [Hkv, L, D]
    v = gather_context(v_cache, block_table_row, seq_len).transpose(0, 1).to(q.dtype)
    mask = causal_mask(qlen, seq_len, sliding_window, q.device)
    # enable_gqa: each kv head serves its group of q heads without materialising copies
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k[None], v[None], attn_mask=mask, scale=scale,
                                         enable_gqa=k.shape[0] != num_heads)
    return out[0].transpose(0, 1)


class ReferenceAttention(AttentionBackend):
    name = "reference"

    def attend(self, q, k_cache, v_cache, meta: AttentionMetadata, scale, sliding_window=None):
        outputs = []
        start = 0
        for i, (qlen, slen) in enumerate(zip(meta.query_lens_host, meta.seq_lens_host)):
            outputs.append(attend_one(q[start:start + qlen], k_cache, v_cache, meta.block_tables[i], slen,
                                      scale, sliding_window))
            start += qlen
        return torch.cat(outputs, dim=0)
