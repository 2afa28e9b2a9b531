"""The attention backend interface. Models call `attend(...)`; a fused kernel can implement it
without the models knowing. Each backend builds its own typed metadata once per iteration."""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from orcinus.attention.metadata import AttentionMetadata, BatchLayout, Upload


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             meta: AttentionMetadata) -> None:
    """Scatter the new tokens' keys and values into their slots, vectorised over all tokens."""
    num_kv_heads, head_dim = k_cache.shape[-2], k_cache.shape[-1]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, v.to(v_cache.dtype))


class AttentionBackend(ABC):
    name: str = "abstract"

    def build(self, layout: BatchLayout, upload: Upload) -> AttentionMetadata:
        """This iteration's metadata, every device tensor uploaded here (before the forward)."""
        return AttentionMetadata(**AttentionMetadata.common(layout, upload))

    @abstractmethod
    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               meta: AttentionMetadata, scale: float, sliding_window: int | None = None) -> torch.Tensor:
        """q: [T, Hq, D] for the flat batch; caches: [num_blocks, block_size, Hkv, D], already holding
        this iteration's keys and values. Returns [T, Hq, D]: each request's queries attend causally
        over its own context only."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                sliding_window: int | None = None) -> torch.Tensor:
        write_kv(k, v, k_cache, v_cache, meta)
        return self.attend(q, k_cache, v_cache, meta, scale, sliding_window)
