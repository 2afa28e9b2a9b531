"""A worker: one model replica (or, later, one shard of it) with its KV pool, its per-request
state and its sampler. It is driven only by `BatchMessage`s, so it can live in another process."""
from __future__ import annotations

import logging

import torch

from orcinus.config import EngineConfig, ModelConfig
from orcinus.executor.messages import BatchMessage, SamplingSettings
from orcinus.executor.model_runner import ModelRunner, default_cpu_kv_bytes
from orcinus.executor.request_state import RequestStates, WorkerRequest
from orcinus.models.loader import load_model
from orcinus.sampler import Sampler, SamplerOutput, SamplingMetadata

logger = logging.getLogger(__name__)


class Worker:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = config.resolved_device()
        self.dtype = config.resolved_dtype(self.device)
        loaded = load_model(config.model, self.dtype, self.device)
        self.model_path = loaded.path
        self.model_config: ModelConfig = loaded.config
        self.max_model_len = min(config.max_model_len or loaded.config.max_position_embeddings,
                                 loaded.config.max_position_embeddings)
        self.runner = ModelRunner(loaded.model, loaded.config, config, self.device, self.dtype)
        self.sampler = Sampler(seed=config.seed)
        self.states = RequestStates(self.device)

    # ------------------------------------------------------------------ KV sizing
    def available_kv_blocks(self) -> int:
        """How many KV blocks this rank can hold next to the model and its peak activations."""
        per_block = self.runner.kv_bytes_per_block()
        ec = self.config
        if ec.kv_cache_memory is not None:
            budget = ec.kv_cache_memory
        elif self.device.type == "cuda":
            budget = self._profiled_cuda_budget()
        else:
            # On CPU activations are small next to the pool and pages are touched lazily.
            budget = default_cpu_kv_bytes()
        num_blocks = budget // per_block
        if num_blocks < 1:
            raise ValueError(
                f"kv_cache_memory={budget} bytes holds no block ({per_block} bytes per block of "
                f"{self.runner.block_size} tokens); raise kv_cache_memory"
            )
        return int(num_blocks)

    def _profiled_cuda_budget(self) -> int:
        """Run the largest batch the settings allow with a tiny KV pool, then give the pool what
        gpu_memory_utilization leaves above that peak."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        self.profile_run()
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        _free, total = torch.cuda.mem_get_info(self.device)
        self.runner.allocate_kv_cache(0)
        torch.cuda.empty_cache()
        budget = int(total * self.config.gpu_memory_utilization) - peak
        logger.info("profiled peak %.2f GiB; %.2f GiB left for the KV pool", peak / 2**30, budget / 2**30)
        return max(budget, 0)

    def profile_run(self) -> None:
        """One forward and sampling pass over the largest batch: max_num_seqs rows and as many
        tokens as the scheduler may put in one iteration, writing into a small throwaway pool."""
        ec = self.config
        tokens = ec.max_num_seqs * self.max_model_len
        if ec.max_num_batched_tokens is not None:
            tokens = min(tokens, max(ec.max_num_batched_tokens, ec.max_num_seqs))
        pool_blocks = 2 * -(-self.max_model_len // self.runner.block_size)
        self.runner.allocate_kv_cache(pool_blocks)
        settings = SamplingSettings(temperature=1.0, top_p=0.9, top_k=50, repetition_penalty=1.1, logprobs=20)
        rows, left = [], tokens
        for i in range(ec.max_num_seqs):
            n = max(1, min(self.max_model_len, left - (ec.max_num_seqs - 1 - i)))
            left -= n
            blocks = [b % pool_blocks for b in range(-(-n // self.runner.block_size))]
            rows.append(WorkerRequest(f"profile-{i}", [0] * n, settings, blocks))
        logits = self.runner.forward_logits(self.runner.prepare(rows))
        self.sampler(logits, SamplingMetadata.from_rows(rows))

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self.runner.allocate_kv_cache(num_blocks)

    # ------------------------------------------------------------------ iterations
    @torch.inference_mode()
    def execute(self, msg: BatchMessage) -> SamplerOutput:
        rows, undo = self.states.apply(msg)
        if not rows:
            return SamplerOutput([], [], [])
        try:
            inp = self.runner.prepare(rows)
            logits = self.runner.forward_logits(inp)
            sampling = [r for r in rows if r.samples]  # prompt chunks short of the end sample nothing
            out = self.sampler(logits, SamplingMetadata.from_rows(sampling)) if sampling \
                else SamplerOutput([], [], [])
        except BaseException:
            # Leave the state as before the message, so the engine may retry these rows.
            self.states.rollback(undo)
            raise
        self.states.commit(rows, inp.num_new_tokens)
        return out
