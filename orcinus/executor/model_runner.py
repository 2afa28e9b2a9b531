"""Turns a batch of requests into flat tensors, runs one iteration of the model, samples.

The model runner knows tensors, never policies: it is told which requests run and how many
tokens each brings, and where their KV blocks are.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import torch

from orcinus.attention.backend import AttentionBackend
from orcinus.attention.metadata import AttentionMetadata
from orcinus.config import EngineConfig, ModelConfig
from orcinus.layers.context import ForwardContext
from orcinus.request import Request
from orcinus.sampler import Sampler, SamplerOutput

logger = logging.getLogger(__name__)



def default_cpu_kv_bytes() -> int:
    """4 GiB, or a quarter of the machine's memory if that is less. Pages are only touched as
    blocks fill, so an idle pool costs little; a big pool lets Orca reserve worst cases."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 8 << 30
    return int(min(4 << 30, total // 4))


@dataclass
class ModelInput:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    sample_indices: torch.Tensor  # [B] flat index of each request's last token


def make_backend(name: str, device: torch.device) -> AttentionBackend:
    if name in ("auto", "batched"):
        try:
            from orcinus.attention.batched import BatchedAttention
            return BatchedAttention()
        except ImportError:
            if name == "batched":
                raise
    from orcinus.attention.reference import ReferenceAttention
    return ReferenceAttention()


def kv_bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.tensor([], dtype=dtype).element_size()
    return 2 * cfg.num_layers * block_size * cfg.num_kv_heads * cfg.head_dim * elem


class ModelRunner:
    def __init__(self, model: torch.nn.Module, model_config: ModelConfig, engine_config: EngineConfig,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.model = model
        self.cfg = model_config
        self.device = device
        self.dtype = dtype
        self.block_size = engine_config.block_size
        self.backend = make_backend(engine_config.attention_backend, device)
        self.sampler = Sampler(seed=engine_config.seed)
        self.num_blocks = self._decide_num_blocks(engine_config)
        shape = (self.num_blocks, self.block_size, model_config.num_kv_heads, model_config.head_dim)
        # torch.empty: slots are only ever read after being written, so no need to zero them
        self.kv_caches = [
            (torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device))
            for _ in range(model_config.num_layers)
        ]

    def _decide_num_blocks(self, ec: EngineConfig) -> int:
        per_block = kv_bytes_per_block(self.cfg, self.block_size, self.dtype)
        if ec.kv_cache_memory is not None:
            budget = ec.kv_cache_memory
        elif self.device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(self.device)
            budget = int(free * ec.gpu_memory_utilization)
        else:
            budget = default_cpu_kv_bytes()
        num_blocks = budget // per_block
        if num_blocks < 1:
            raise ValueError(
                f"kv_cache_memory={budget} bytes holds no block ({per_block} bytes per block of "
                f"{self.block_size} tokens); raise kv_cache_memory"
            )
        return int(num_blocks)

    # ------------------------------------------------------------------ inputs
    def prepare(self, requests: list[Request], num_new_tokens: list[int],
                block_tables: list[list[int]]) -> ModelInput:
        """Flatten the batch: array operations per iteration, no Python loop per token."""
        bs = self.block_size
        q_lens = np.asarray(num_new_tokens, dtype=np.int64)
        ctx_before = np.asarray([r.num_computed_tokens for r in requests], dtype=np.int64)
        seq_lens = ctx_before + q_lens
        cu = np.zeros(len(requests) + 1, dtype=np.int64)
        np.cumsum(q_lens, out=cu[1:])
        num_tokens = int(cu[-1])
        token_ids: list[int] = []
        for r, n in zip(requests, num_new_tokens):
            token_ids.extend(r.all_token_ids[r.num_computed_tokens:r.num_computed_tokens + n])
        req_of_token = np.repeat(np.arange(len(requests)), q_lens)
        positions = np.arange(num_tokens) - cu[:-1][req_of_token] + ctx_before[req_of_token]
        max_blocks = max(len(t) for t in block_tables)
        table = np.zeros((len(requests), max_blocks), dtype=np.int64)
        for i, t in enumerate(block_tables):
            table[i, :len(t)] = t
        slots = table[req_of_token, positions // bs] * bs + positions % bs

        up = self._upload
        meta = AttentionMetadata(
            query_start_loc=up(cu.astype(np.int32)),
            seq_lens=up(seq_lens.astype(np.int32)),
            block_tables=up(table),
            slot_mapping=up(slots),
            query_lens_host=q_lens.tolist(),
            seq_lens_host=seq_lens.tolist(),
            max_query_len=int(q_lens.max()),
            max_seq_len=int(seq_lens.max()),
            block_size=bs,
        )
        return ModelInput(
            input_ids=up(np.asarray(token_ids, dtype=np.int64)),
            positions=up(positions),
            meta=meta,
            sample_indices=up(cu[1:] - 1),
        )

    def _upload(self, array: np.ndarray) -> torch.Tensor:
        """Host array to device; on CUDA through pinned memory so the copy is asynchronous."""
        t = torch.from_numpy(np.ascontiguousarray(array))
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t

    # ------------------------------------------------------------------ execution
    @torch.inference_mode()
    def forward_logits(self, inp: ModelInput) -> torch.Tensor:
        """Logits only at the sampled positions (one row per request)."""
        ctx = ForwardContext(inp.meta, self.kv_caches, self.backend)
        hidden = self.model(inp.input_ids, inp.positions, ctx)
        return self.model.compute_logits(hidden.index_select(0, inp.sample_indices)).float()

    @torch.inference_mode()
    def execute(self, requests: list[Request], num_new_tokens: list[int],
                block_tables: list[list[int]]) -> SamplerOutput:
        logits = self.forward_logits(self.prepare(requests, num_new_tokens, block_tables))
        return self.sampler(logits, requests)
