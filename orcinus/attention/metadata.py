"""Per-iteration attention metadata: which flat token belongs to which request, and where each
request's keys and values live in the block pool. Built once per iteration by the model runner
(with array operations) and shared by every layer."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class AttentionMetadata:
    # device tensors
    query_start_loc: torch.Tensor  # [B+1] int32, cumulative query lengths into the flat tensor
    seq_lens: torch.Tensor  # [B] int32, context length of each request *after* this iteration
    block_tables: torch.Tensor  # [B, max_blocks] int32 (rows padded with 0, never read past seq_len)
    slot_mapping: torch.Tensor  # [T] int64, flat KV slot of every new token
    # host copies for backends that loop or size buffers (no device sync needed)
    query_lens_host: list[int]
    seq_lens_host: list[int]
    max_query_len: int
    max_seq_len: int
    block_size: int
    # backend-private, built lazily once per iteration and reused by all layers
    cache: dict = field(default_factory=dict)

    @property
    def num_requests(self) -> int:
        return len(self.query_lens_host)

    @property
    def num_tokens(self) -> int:
        return int(self.slot_mapping.shape[0])
