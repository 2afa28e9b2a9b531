"""The one layer that needs to know which token belongs to which request."""
from __future__ import annotations

import torch
from torch import nn

from orcinus.layers.context import ForwardContext


class PagedAttention(nn.Module):
    """Writes the flat batch's k/v into the block pool, then attends per request via the backend.
    `kv_index`: the layer's entry in this pipeline stage's KV pool (stage-local)."""

    def __init__(self, kv_index: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 scale: float, sliding_window: int | None = None) -> None:
        super().__init__()
        self.kv_index = kv_index
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.sliding_window = sliding_window

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        t = q.shape[0]
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        k_cache, v_cache = ctx.kv_caches[self.kv_index]
        out = ctx.backend.forward(q, k, v, k_cache, v_cache, ctx.meta, self.scale, self.sliding_window)
        return out.reshape(t, self.num_heads * self.head_dim)
