"""The attention backend interface. `PagedAttention` (layers/attention.py) calls `forward`, which
writes the new keys/values into the pool and calls `attend`; a fused kernel can implement either
without the models knowing. Each backend builds its own typed metadata once per iteration.

CUDA graphs (orcinus/executor/cuda_graphs.py) capture increment-only batches over static buffers.
The backend owns what its metadata needs there: `graph_buffers` names the static regions it adds
to the common ones (and their constant contents, one token per row), `graph_metadata` builds its
metadata over those device tensors, and `capturable` says whether its forward reads nothing but
device tensors and shapes, so that a replay is correct. The executor knows no backend by name.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from orcinus.attention.metadata import AttentionMetadata, BatchLayout, Upload


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             meta: AttentionMetadata) -> None:
    """Scatter the new tokens' keys and values into their slots, vectorised over all tokens."""
    num_kv_heads, head_dim = k_cache.shape[-2], k_cache.shape[-1]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, v.to(v_cache.dtype))


@dataclass(frozen=True)
class GraphBuffer:
    """A static region a backend adds for CUDA graphs: one entry per row of the largest batch
    (+ `extra`) of `dtype`, filled once with `fill(entries)`; a batch of n rows reads its first
    n (+ extra)."""

    name: str
    dtype: type
    extra: int = 0
    fill: Callable[[int], np.ndarray] = np.arange  # entries -> their constant contents


class AttentionBackend(ABC):
    name: str = "abstract"
    capturable: bool = False  # forward reads only device tensors and shapes (a CUDA graph may replay it)

    def warm_up(self, device: torch.device) -> None:
        """Build or load what the backend's kernels need before the first iteration (start-up)."""

    def graph_buffers(self) -> list[GraphBuffer]:
        """Static regions this backend's graph metadata needs besides the common ones."""
        return []

    def graph_metadata(self, static: dict[str, torch.Tensor], rows: int, seq_lens: np.ndarray,
                       block_size: int) -> AttentionMetadata:
        """The metadata of an increment-only batch of `rows` rows (padding included) over the
        static device tensors (the common ones and this backend's `graph_buffers`)."""
        return AttentionMetadata(**graph_common(static, rows, seq_lens, block_size))

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


def graph_common(static: dict[str, torch.Tensor], rows: int, seq_lens: np.ndarray, block_size: int) -> dict:
    """The common metadata fields of an increment-only batch over static buffers. The host fields
    are right for this batch (an eager run may use them); a replay reads only the device tensors."""
    return dict(query_start_loc=static["query_start_loc"][:rows + 1], seq_lens=static["seq_lens"][:rows],
                block_tables=static["block_tables"][:rows], slot_mapping=static["slot_mapping"][:rows],
                query_lens_host=[1] * rows, seq_lens_host=seq_lens.tolist(), block_size=block_size)
