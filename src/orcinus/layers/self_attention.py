"""The self-attention block every family shares: q/k/v in one column-parallel GEMM, optional
per-head q/k norms (Qwen3) and rotary positions (the Llama family), paged attention over the
block pool, a row-parallel output projection.

Tensor parallelism (Megatron): each rank holds some query heads and their KV heads (with fewer KV
heads than ranks, each KV head is replicated on the ranks whose query heads use it), and the
output projection sums the ranks' partial results with one all-reduce.
"""
from __future__ import annotations

import torch
from torch import nn

from orcinus.distributed.parallel_state import even_split, kv_head_range
from orcinus.layers.attention import PagedAttention
from orcinus.layers.context import ForwardContext
from orcinus.layers.linear import MergedColumnParallelLinear, RowParallelLinear
from orcinus.layers.norms import RMSNorm
from orcinus.layers.rotary import RotaryEmbedding


class SelfAttention(nn.Module):
    """`kv_index`: this layer's place in this pipeline stage's KV pool. `scale`: the softmax
    scale (default head_dim**-0.5). `qk_norm_eps`: RMSNorm q and k per head (Qwen3)."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, kv_index: int, *,
                 qkv_bias: bool, out_bias: bool, rotary: RotaryEmbedding | None = None,
                 scale: float | None = None, sliding_window: int | None = None,
                 qk_norm_eps: float | None = None) -> None:
        super().__init__()
        d = head_dim
        self.head_dim = d
        heads = even_split(num_heads, "the number of attention heads")
        kv_start, kv_heads = kv_head_range(num_kv_heads)
        kv_part = (num_kv_heads * d, (kv_start * d, kv_heads * d))
        # The checkpoint's q/k/v tensors load into the three parts of one weight.
        self.qkv_proj = MergedColumnParallelLinear(hidden_size, [(num_heads * d, None), kv_part, kv_part], qkv_bias)
        self.o_proj = RowParallelLinear(num_heads * d, hidden_size, out_bias)
        self.qk_norm = qk_norm_eps is not None
        if self.qk_norm:
            self.q_norm = RMSNorm(d, qk_norm_eps)
            self.k_norm = RMSNorm(d, qk_norm_eps)
        self.rotary = [rotary] if rotary is not None else None  # shared by the layers, kept out of the module tree
        self.attn = PagedAttention(kv_index, heads, kv_heads, d, d ** -0.5 if scale is None else scale, sliding_window)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv_proj.split(self.qkv_proj(x))
        if self.qk_norm:
            q = self.q_norm(q.view(t, -1, self.head_dim)).view(t, -1)
            k = self.k_norm(k.view(t, -1, self.head_dim)).view(t, -1)
        if self.rotary is not None:
            q, k = self.rotary[0](positions, q, k, self.head_dim)
        # q, k, v may be strided views of the fused output: every backend reads rows by stride.
        return self.o_proj(self.attn(q, k, v, ctx))
