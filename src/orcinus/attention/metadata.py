"""Per-iteration attention metadata: which flat token belongs to which request, and where each
request's keys and values live in the block pool.

The model runner describes the batch on the host (`BatchLayout`, numpy arrays); the backend turns
that into its own typed metadata in one `build` step before the forward pass, so every device
tensor is uploaded once per iteration and no layer does host work or host-to-device copies."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

Upload = Callable[[np.ndarray], torch.Tensor]


@dataclass
class BatchLayout:
    """The flat batch on the host, built with array operations by the model runner."""

    query_lens: np.ndarray  # [B] int64, tokens each request brings this iteration
    seq_lens: np.ndarray  # [B] int64, context length of each request *after* this iteration
    block_table: np.ndarray  # [B, max_blocks] int64 (rows padded with 0, never read past seq_len)
    slot_mapping: np.ndarray  # [T] int64, flat KV slot of every new token
    block_size: int

    @property
    def query_start_loc(self) -> np.ndarray:
        cu = np.zeros(len(self.query_lens) + 1, dtype=np.int64)
        np.cumsum(self.query_lens, out=cu[1:])
        return cu


@dataclass
class AttentionMetadata:
    # device tensors
    query_start_loc: torch.Tensor  # [B+1] int32, cumulative query lengths into the flat tensor
    seq_lens: torch.Tensor  # [B] int32
    block_tables: torch.Tensor  # [B, max_blocks] int64
    slot_mapping: torch.Tensor  # [T] int64
    # host copies for backends that loop or size buffers (no device sync needed)
    query_lens_host: list[int]
    seq_lens_host: list[int]
    block_size: int

    @classmethod
    def common(cls, layout: BatchLayout, upload: Upload) -> dict:
        """The fields every backend's metadata shares, as keyword arguments."""
        return dict(
            query_start_loc=upload(layout.query_start_loc.astype(np.int32)),
            seq_lens=upload(layout.seq_lens.astype(np.int32)),
            block_tables=upload(layout.block_table),
            slot_mapping=upload(layout.slot_mapping),
            query_lens_host=layout.query_lens.tolist(),
            seq_lens_host=layout.seq_lens.tolist(),
            block_size=layout.block_size,
        )
