"""What every layer of one forward pass shares: the metadata, the KV pool, the backend."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from orcinus.attention.backend import AttentionBackend
from orcinus.attention.metadata import AttentionMetadata


@dataclass
class ForwardContext:
    meta: AttentionMetadata
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]  # per layer of this pipeline stage: (k_cache, v_cache)
    backend: AttentionBackend
