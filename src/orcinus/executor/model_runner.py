"""Turns a batch of worker-side requests into flat tensors and runs one forward pass.

The model runner knows tensors, never policies: it is told which requests run (with their state
on this worker: tokens, block tables) and computes each one's tokens not yet in the KV cache.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import torch

from orcinus.attention.backend import AttentionBackend
from orcinus.attention.metadata import AttentionMetadata, BatchLayout
from orcinus.attention.selector import make_backend  # noqa: F401  (re-exported: the backend factory)
from orcinus.config import EngineConfig, ModelConfig
from orcinus.distributed.parallel_state import kv_head_range
from orcinus.executor.request_state import WorkerRequest
from orcinus.layers.context import ForwardContext

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
    sample_indices: torch.Tensor  # [S] flat index of the last token of each request that samples
    num_new_tokens: list[int]  # per request


def kv_bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype, num_layers: int | None = None,
                       num_kv_heads: int | None = None) -> int:
    elem = torch.tensor([], dtype=dtype).element_size()
    layers = cfg.num_layers if num_layers is None else num_layers
    heads = cfg.num_kv_heads if num_kv_heads is None else num_kv_heads
    return 2 * layers * block_size * heads * cfg.head_dim * elem


class ModelRunner:
    def __init__(self, model: torch.nn.Module, model_config: ModelConfig, engine_config: EngineConfig,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.model = model
        self.cfg = model_config
        self.device = device
        self.dtype = dtype
        self.block_size = engine_config.block_size
        self.backend = make_backend(engine_config.attention_backend, device)
        self.num_blocks = 0
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.num_kv_heads = kv_head_range(model_config.num_kv_heads)[1]  # on this tensor-parallel rank
        self.num_layers = getattr(model, "num_local_layers", model_config.num_layers)  # on this stage

    # ------------------------------------------------------------------ KV pool
    def kv_bytes_per_block(self) -> int:
        return kv_bytes_per_block(self.cfg, self.block_size, self.dtype, self.num_layers, self.num_kv_heads)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        shape = (num_blocks, self.block_size, self.num_kv_heads, self.cfg.head_dim)
        # torch.empty: slots are only ever read after being written, so no need to zero them
        self.kv_caches = [
            (torch.empty(shape, dtype=self.dtype, device=self.device),
             torch.empty(shape, dtype=self.dtype, device=self.device))
            for _ in range(self.num_layers)
        ]
        self.num_blocks = num_blocks

    # ------------------------------------------------------------------ inputs
    def prepare(self, rows: list[WorkerRequest]) -> ModelInput:
        """Flatten the batch: array operations per iteration, no Python loop per token."""
        bs = self.block_size
        ctx_before = np.asarray([r.num_computed_tokens for r in rows], dtype=np.int64)
        q_lens = np.asarray([r.num_new_tokens for r in rows], dtype=np.int64)
        seq_lens = ctx_before + q_lens
        cu = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(q_lens, out=cu[1:])
        num_tokens = int(cu[-1])
        token_ids: list[int] = []
        for r, n in zip(rows, q_lens.tolist()):
            if n == 1:
                token_ids.append(r.token_at(r.num_computed_tokens))
            else:
                token_ids.extend((r.prompt_token_ids + r.output_token_ids)[r.num_computed_tokens:r.num_computed_tokens + n])
        req_of_token = np.repeat(np.arange(len(rows)), q_lens)
        positions = np.arange(num_tokens) - cu[:-1][req_of_token] + ctx_before[req_of_token]
        max_blocks = max(len(r.block_ids) for r in rows)
        table = np.zeros((len(rows), max_blocks), dtype=np.int64)
        for i, r in enumerate(rows):
            table[i, :len(r.block_ids)] = r.block_ids
        slots = table[req_of_token, positions // bs] * bs + positions % bs
        layout = BatchLayout(q_lens, seq_lens, table, slots, bs)
        up = self._upload
        return ModelInput(
            input_ids=up(np.asarray(token_ids, dtype=np.int64)),
            positions=up(positions),
            meta=self.backend.build(layout, up),
            # a prompt chunk that does not reach the end of its sequence samples nothing
            sample_indices=up((cu[1:] - 1)[[r.samples for r in rows]]),
            num_new_tokens=q_lens.tolist(),
        )

    def _upload(self, array: np.ndarray) -> torch.Tensor:
        """Host array to device; on CUDA through pinned memory so the copy is asynchronous."""
        t = torch.from_numpy(np.ascontiguousarray(array))
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t

    # ------------------------------------------------------------------ execution
    @torch.inference_mode()
    def forward_logits(self, inp: ModelInput, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Logits only at the sampled positions (one row per request that samples)."""
        hidden = self.forward_stage(inp, hidden)
        return self.model.compute_logits(hidden.index_select(0, inp.sample_indices)).float()

    @torch.inference_mode()
    def forward_stage(self, inp: ModelInput, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """This pipeline stage's layers: from token ids on the first stage, else from `hidden`."""
        ctx = ForwardContext(inp.meta, self.kv_caches, self.backend)
        if hidden is None:
            return self.model(inp.input_ids, inp.positions, ctx)
        return self.model(inp.input_ids, inp.positions, ctx, hidden)
