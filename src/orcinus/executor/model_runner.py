"""Turns a batch of worker-side requests into flat tensors and runs one forward pass.

The model runner knows tensors, never policies: it is told which requests run (with their state
on this worker: tokens, block tables) and computes each one's tokens not yet in the KV cache.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from orcinus.attention.metadata import AttentionMetadata, BatchLayout
from orcinus.attention.selector import make_backend
from orcinus.config import DTYPES, EngineConfig, ModelConfig
from orcinus.errors import ConfigError
from orcinus.distributed.parallel_state import kv_head_range
from orcinus.executor.cuda_graphs import DecodeGraphs, DecodeInputs, plan_cuda_graphs
from orcinus.executor.host_staging import PackedUpload, zero_copy_upload
from orcinus.executor.messages import PromptLogprobsChunk
from orcinus.executor.prompt_logprobs import PromptSpan, compute_prompt_logprobs, prompt_spans
from orcinus.executor.request_state import WorkerRequest
from orcinus.layers import fused_decode
from orcinus.layers.context import ForwardContext
from orcinus.layers.quantized_linear import quantized_bytes
from orcinus.models.causal_lm import CausalLM

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
    padded: int | None = None  # an increment-only batch padded to this size (CUDA graph inputs)
    # positions whose logits give prompt log-probs (rows that ask for them, last stage only)
    prompt_spans: list[PromptSpan] = field(default_factory=list)


def kv_bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype, num_layers: int | None = None,
                       num_kv_heads: int | None = None) -> int:
    elem = torch.tensor([], dtype=dtype).element_size()
    layers = cfg.num_layers if num_layers is None else num_layers
    heads = cfg.num_kv_heads if num_kv_heads is None else num_kv_heads
    return 2 * layers * block_size * heads * cfg.head_dim * elem


def resolve_kv_dtype(name: str, model_dtype: torch.dtype, device: torch.device,
                     weights_quantized: bool = False) -> torch.dtype:
    """The KV pool's dtype for `kv_cache_dtype=name`. auto: float16 for a float32 model whose weights
    are kept in GGUF blocks on CPU (a path that already rounds every activation to 16 bits; there
    the half pool measured 5 % faster on the 64-request trace, with greedy tokens equal to the
    float32 pool's on every reference prompt and logits within 0.018: docs/benchmarks.md, "Issue 21,
    fifth round"), else the model's dtype. Another dtype than the model's is read by the CPU
    attention kernels (which convert as they load); the CUDA kernels read the model's only, so
    there it is refused."""
    if name == "auto":
        if device.type == "cpu" and model_dtype == torch.float32 and weights_quantized:
            return torch.float16
        return model_dtype
    kv = DTYPES[name]
    if kv != model_dtype and device.type != "cpu":
        raise ConfigError(f"kv_cache_dtype={name} with a {str(model_dtype).removeprefix('torch.')} model is "
                          "supported on CPU only; on CUDA leave kv_cache_dtype=auto")
    return kv


def upload_capacity(tokens: int, seqs: int, max_blocks: int) -> int:
    """Bytes of one iteration's packed metadata: per token ids, positions, slots (int64) and
    Triton tiles (2 x int32); per request query starts, context lengths (int32), sample index
    (int64) and a block-table row; plus alignment. Backends that need more grow the buffer."""
    return tokens * (3 * 8 + 2 * 4) + seqs * (4 + 4 + 8 + 8 * max_blocks) + 16 * 64


class ModelRunner:
    def __init__(self, model: CausalLM, model_config: ModelConfig, engine_config: EngineConfig,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.model = model
        self.cfg = model_config
        self.device = device
        self.dtype = dtype
        self.kv_dtype = resolve_kv_dtype(engine_config.kv_cache_dtype, dtype, device,
                                         weights_quantized=quantized_bytes(model)[0] > 0)
        self.block_size = engine_config.block_size
        self.backend = make_backend(engine_config.attention_backend, device)
        self.backend.warm_up(device)  # e.g. the CPU decode kernel compiles here, not in the first decode
        if device.type == "cpu" and fused_decode.prepare(model):  # its library and structs, likewise
            logger.info("iterations of up to %d tokens (decodes and prompt chunks): one C call through the "
                        "layers (fused_decode; %s=0 runs the PyTorch modules)", fused_decode.max_rows(),
                        fused_decode.ENV_SWITCH)
        self.num_blocks = 0
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.num_kv_heads = kv_head_range(model_config.num_kv_heads)[1]  # on this tensor-parallel rank
        self.num_layers = model.num_local_layers  # on this pipeline stage
        max_len = min(engine_config.max_model_len or model_config.max_position_embeddings,
                      model_config.max_position_embeddings)
        self.max_blocks_per_seq = -(-max_len // self.block_size)
        self.max_num_seqs = engine_config.max_num_seqs
        self.graph_plan = plan_cuda_graphs(engine_config, device)
        self.graphs: DecodeGraphs | None = None  # set by capture_cuda_graphs
        # One host-to-device copy per iteration on CUDA, into persistent buffers sized for the
        # largest iteration (they grow if an attention backend needs more); none on CPU.
        if device.type == "cuda":
            # the budget is finite (orcinus/bench/budgets.py), and no iteration holds more than its rows can
            tokens = min(max(engine_config.resolved_max_num_batched_tokens(device), self.max_num_seqs),
                         self.max_num_seqs * max_len)
            self.upload = PackedUpload(device, upload_capacity(tokens, self.max_num_seqs, self.max_blocks_per_seq))
        else:
            self.upload = zero_copy_upload

    # ------------------------------------------------------------------ KV pool
    def kv_bytes_per_block(self) -> int:
        return kv_bytes_per_block(self.cfg, self.block_size, self.kv_dtype, self.num_layers, self.num_kv_heads)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """`num_blocks` for the engine's requests; with CUDA graphs one more, the padding block
        (index num_blocks), which padding rows of a replayed batch write to and read from."""
        extra = 1 if self.graph_plan.enabled else 0
        shape = (num_blocks + extra, self.block_size, self.num_kv_heads, self.cfg.head_dim)
        # torch.empty: slots are only ever read after being written, so no need to zero them
        self.kv_caches = [
            (torch.empty(shape, dtype=self.kv_dtype, device=self.device),
             torch.empty(shape, dtype=self.kv_dtype, device=self.device))
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
        # a prompt chunk that does not reach the end of its sequence samples nothing
        sample_indices = (cu[1:] - 1)[[r.samples for r in rows]]
        ids = np.asarray(token_ids, dtype=np.int64)
        spans = prompt_spans(rows, cu[:-1].tolist())
        padded = self.graphs.padded_size(q_lens, table.shape[1]) if self.graphs is not None else None
        if padded is not None:  # increment-only: the CUDA graph's static inputs, padded
            g = self.graphs.prepare(padded, ids, positions, slots, seq_lens, table, sample_indices)
            return ModelInput(g.input_ids, g.positions, g.meta, g.sample_indices, q_lens.tolist(), padded, spans)
        layout = BatchLayout(q_lens, seq_lens, table, slots, bs)
        up = self.upload
        if isinstance(up, PackedUpload):
            up.begin()
        inp = ModelInput(
            input_ids=up(ids),
            positions=up(positions),
            meta=self.backend.build(layout, up),
            sample_indices=up(sample_indices),
            num_new_tokens=q_lens.tolist(),
            prompt_spans=spans,
        )
        if isinstance(up, PackedUpload):
            up.flush()  # the one host-to-device copy of this iteration
        return inp

    # ------------------------------------------------------------------ CUDA graphs
    def capture_cuda_graphs(self) -> None:
        """After the KV pool exists: capture the increment-only forward for every planned size
        (nothing when the plan says off: CPU, enforce_eager, parallel ranks, a backend that
        cannot be captured)."""
        if not self.graph_plan.enabled or not self.kv_caches or self.device.type != "cuda":
            return
        self.graphs = DecodeGraphs(self.graph_plan.sizes, self.max_blocks_per_seq, self.block_size,
                                   padding_block=self.num_blocks, device=self.device, backend=self.backend)
        with torch.inference_mode():
            self.graphs.capture(self._forward_static)

    def _forward_static(self, g: DecodeInputs) -> torch.Tensor:
        return self.model(g.input_ids, g.positions, ForwardContext(g.meta, self.kv_caches, self.backend))

    # ------------------------------------------------------------------ execution
    @torch.inference_mode()
    def forward_logits(self, inp: ModelInput, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Logits only at the sampled positions (one row per request that samples)."""
        return self.forward_outputs(inp, hidden)[0]

    @torch.inference_mode()
    def forward_outputs(self, inp: ModelInput, hidden: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, dict[str, PromptLogprobsChunk]]:
        """Last stage: the sampling rows' logits, and the prompt log-probs of the rows that ask
        (an empty dict, at no cost, when none does)."""
        hidden = self.forward_stage(inp, hidden)
        logits = self.model.compute_logits(hidden.index_select(0, inp.sample_indices)).float()
        return logits, compute_prompt_logprobs(hidden, inp.prompt_spans, self.model.compute_logits)

    @torch.inference_mode()
    def forward_stage(self, inp: ModelInput, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """This pipeline stage's layers: from token ids on the first stage, else from `hidden`."""
        if inp.padded is not None and hidden is None and self.graphs is not None \
                and inp.padded in self.graphs.graphs:
            return self.graphs.replay(inp.padded)  # rows past the batch are padding, never sampled
        ctx = ForwardContext(inp.meta, self.kv_caches, self.backend)
        if hidden is None:
            return self.model(inp.input_ids, inp.positions, ctx)
        return self.model(inp.input_ids, inp.positions, ctx, hidden)
