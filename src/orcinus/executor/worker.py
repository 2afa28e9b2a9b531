"""A worker: one model replica (or, later, one shard of it) with its KV pool, its per-request
state and its sampler. It is driven only by `BatchMessage`s, so it can live in another process."""
from __future__ import annotations

import logging
from collections import OrderedDict

import torch

from orcinus.config import EngineConfig, ModelConfig
from orcinus.cpu_features import configure_cpu_threads
from orcinus.distributed.parallel_state import pipeline_stage, recv_from_prev_stage, send_to_next_stage
from orcinus.executor.cuda_memory import (CudaMemoryPlan, MemoryProbe, TorchCudaProbe, graph_reserve,
                                           measure_peak, rank_device)
from orcinus.executor.messages import BatchMessage, SamplerOutput, SamplingSettings, WorkerInfo
from orcinus.executor.kv_budget import check_kv_budget
from orcinus.executor.model_runner import ModelRunner, default_cpu_kv_bytes
from orcinus.executor.phase_timing import IterationTimer, phase
from orcinus.executor.request_state import RequestStates, WorkerRequest
from orcinus.executor.platform import dtype_note, resolve_device, resolve_dtype
from orcinus.layers.quantized_linear import keep_quantized
from orcinus.models.loader import load_model, resolve_model_path
from orcinus.executor.sampler import Sampler, SamplingMetadata

logger = logging.getLogger(__name__)

_UNDO_KEPT = 64  # far more than the batches that can be in flight


class Worker:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = resolve_device(config)
        if self.device.type == "cuda":
            # This thread's current device: Triton launches, graph capture and the caching
            # allocator use it, not the tensors' device, so cuda:1 would otherwise run on cuda:0.
            self.device = rank_device(self.device, 0, 1, torch.cuda.device_count())
            torch.cuda.set_device(self.device)
        model_path = resolve_model_path(config.model)
        self.dtype = resolve_dtype(config, self.device, model_path)
        local_ranks = max(1, config.tensor_parallel_size * config.pipeline_parallel_size // config.nnodes)
        if self.device.type == "cpu" or local_ranks > 1:
            # This process's share of the cores it may use (the ranks on this machine split them),
            # unless OMP_NUM_THREADS says otherwise: ranks that each spin on every core slow each
            # other down.
            configure_cpu_threads(local_ranks)
        loaded = load_model(model_path, self.dtype, self.device,
                            keep_quantized=keep_quantized(config.quantization, self.device))
        self.model_path = loaded.path
        self.model_config: ModelConfig = loaded.config
        self.max_model_len = min(config.max_model_len or loaded.config.max_position_embeddings,
                                 loaded.config.max_position_embeddings)
        self.runner = ModelRunner(loaded.model, loaded.config, config, self.device, self.dtype)
        self.sampler = Sampler(seed=config.seed)
        self.states = RequestStates(self.device)
        self.memory_probe: MemoryProbe | None = None  # None: torch.cuda's (tests put a simulated card here)
        self.memory_plan: CudaMemoryPlan | None = None  # CUDA: how the KV pool was sized
        # undo records of recent messages, should another rank or stage fail them
        self._applied: OrderedDict[int, object] = OrderedDict()

    def ready_info(self) -> WorkerInfo:
        """This rank's first reply: the pool it can hold and what it resolved at start-up."""
        gguf_sampling = {}
        if self.model_path.endswith(".gguf"):
            from orcinus.models.gguf_loader import read_gguf_metadata

            gguf_sampling = {k: v for k, v in read_gguf_metadata(self.model_path).items()
                             if k.startswith("general.sampling.")}
        return WorkerInfo(self.available_kv_blocks(), self.model_config, self.model_path, str(self.device),
                          str(self.dtype).removeprefix("torch."), dtype_note(self.config, self.device, self.model_path),
                          self.runner.graph_plan.describe(), gguf_sampling,
                          str(self.runner.kv_dtype).removeprefix("torch."))

    # ------------------------------------------------------------------ KV sizing
    def available_kv_blocks(self) -> int:
        """How many KV blocks this rank can hold next to the model and its peak activations."""
        per_block = self.runner.kv_bytes_per_block()
        ec = self.config
        if ec.kv_cache_memory is not None:
            budget = ec.kv_cache_memory
            check_kv_budget(budget, self.device)
        elif self.device.type == "cuda" or self.memory_probe is not None:
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
        """gpu_memory_utilization of the free memory, less the activations of the largest
        iteration and the CUDA graphs' memory, both measured (orcinus/executor/cuda_memory.py)."""
        self.memory_plan = self.plan_cuda_memory(self.memory_probe or TorchCudaProbe(self.device))
        logger.info("KV sizing: %s", self.memory_plan.describe())
        return self.memory_plan.kv_budget

    def plan_cuda_memory(self, probe: MemoryProbe) -> CudaMemoryPlan:
        probe.synchronize()
        probe.empty_cache()
        free, total = probe.mem_get_info()
        tokens = self.profile_tokens()
        pool_blocks = self._profile_pool_blocks()
        self.runner.allocate_kv_cache(pool_blocks)  # throwaway, before the measurement: not counted
        try:
            try:
                activations = measure_peak(probe, self.profile_run)
                decode_peak = measure_peak(probe, self.profile_decode_run) if self.runner.graph_plan.enabled else 0
            except torch.cuda.OutOfMemoryError as exc:
                raise ValueError(
                    f"one iteration of {tokens} tokens over {self.config.max_num_seqs} requests does not fit on "
                    f"{self.device} next to the model ({exc}); lower max_num_batched_tokens or max_num_seqs") from None
        finally:
            self.runner.allocate_kv_cache(0)
            probe.empty_cache()
        plan = CudaMemoryPlan(free, total, self.config.gpu_memory_utilization, activations,
                              graph_reserve(decode_peak, len(self.runner.graph_plan.sizes)), tokens)
        if plan.kv_budget < self.runner.kv_bytes_per_block():
            raise ValueError(f"no room for a KV pool on {self.device}: {plan.describe()}; lower "
                             "max_num_batched_tokens or max_num_seqs, raise gpu_memory_utilization, or free the GPU")
        return plan

    def profile_tokens(self) -> int:
        """Tokens in the largest iteration: max_num_seqs rows and the whole token budget (always
        finite), no more than the rows can hold."""
        ec = self.config
        tokens = max(ec.resolved_max_num_batched_tokens(self.device), ec.max_num_seqs)
        return min(tokens, ec.max_num_seqs * self.max_model_len)

    def _profile_pool_blocks(self) -> int:
        """Enough blocks for the profiled rows, and no more: a pool for two whole contexts of a
        long-context model (Qwen3's 40,960 tokens) would take gigabytes the sizing then measures
        around. Rows share blocks beyond that; their values do not matter."""
        bs = self.runner.block_size
        return min(2 * -(-self.max_model_len // bs), -(-self.profile_tokens() // bs) + self.config.max_num_seqs)

    def profile_run(self) -> None:
        """One forward and sampling pass over the largest batch: max_num_seqs rows and as many
        tokens as the scheduler may put in one iteration, writing into a small throwaway pool
        (allocated here unless one is)."""
        ec = self.config
        tokens = self.profile_tokens()
        pool_blocks = self._profile_pool_blocks()
        if self.runner.num_blocks != pool_blocks or not self.runner.kv_caches:
            self.runner.allocate_kv_cache(pool_blocks)
        settings = SamplingSettings(temperature=1.0, top_p=0.9, top_k=50, repetition_penalty=1.1, logprobs=20)
        rows, left = [], tokens
        for i in range(ec.max_num_seqs):
            n = max(1, min(self.max_model_len, left - (ec.max_num_seqs - 1 - i)))
            left -= n
            blocks = [b % pool_blocks for b in range(-(-n // self.runner.block_size))]
            rows.append(WorkerRequest(f"profile-{i}", [0] * n, settings, blocks))
        self._profile_forward(rows, sample=True)

    def profile_decode_run(self) -> None:
        """The largest increment-only batch, eagerly: what the biggest CUDA graph captures."""
        settings = SamplingSettings(temperature=0.0)
        blocks = list(range(-(-2 // self.runner.block_size)))
        rows = [WorkerRequest(f"profile-decode-{i}", [0, 0], settings, blocks, num_computed_tokens=1)
                for i in range(self.config.max_num_seqs)]
        self._profile_forward(rows, sample=False)

    def _profile_forward(self, rows: list[WorkerRequest], sample: bool) -> None:
        inp = self.runner.prepare(rows)
        stage = pipeline_stage()
        hidden = None
        if not stage.is_first:
            hidden = recv_from_prev_stage(len(inp.input_ids), self.model_config.hidden_size, self.dtype, self.device)
        if stage.is_last and sample:
            logits = self.runner.forward_logits(inp) if hidden is None else self.runner.forward_logits(inp, hidden)
            self.sampler(logits, SamplingMetadata.from_rows(rows))
        else:
            out = self.runner.forward_stage(inp, hidden)
            if not stage.is_last:
                send_to_next_stage(out, self.device)

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self.runner.allocate_kv_cache(num_blocks)
        self.runner.capture_cuda_graphs()  # CUDA only; after the pool, which the graphs address
        graphs, plan = self.runner.graphs, self.memory_plan
        if graphs is not None and plan is not None and graphs.memory_bytes > plan.graph_reserve:
            logger.warning("the CUDA graphs took %.2f GiB, more than the %.2f GiB reserved for them before the KV pool",
                           graphs.memory_bytes / 2**30, plan.graph_reserve / 2**30)

    # ------------------------------------------------------------------ iterations
    @torch.inference_mode()
    def execute(self, msg: BatchMessage) -> SamplerOutput | None:
        """Run this rank's part of one iteration. The last pipeline stage returns the sampled
        tokens; earlier stages send their hidden states on and return None."""
        stage = pipeline_stage()
        rows, undo = self.states.apply(msg)
        sent = stage.is_last
        timer = IterationTimer(self.device) if msg.timed else None
        try:
            if not rows:
                return SamplerOutput([], [], []) if stage.is_last else None
            with phase(timer, "input preparation"):
                inp = self.runner.prepare(rows)
            hidden = None
            if not stage.is_first:
                hidden = recv_from_prev_stage(len(inp.input_ids), self.model_config.hidden_size, self.dtype,
                                              self.device)
                if hidden is None:
                    raise UpstreamFailed("this batch failed on an earlier pipeline stage")
            if not stage.is_last:
                with phase(timer, "forward"):
                    hidden = self.runner.forward_stage(inp, hidden)
                sent = True
                send_to_next_stage(hidden, self.device)
                out = None
            else:
                with phase(timer, "forward"):
                    if inp.prompt_spans:  # some row asked for prompt log-probs
                        logits, prompt_lps = self.runner.forward_outputs(inp, hidden)
                    else:
                        prompt_lps = {}
                        logits = self.runner.forward_logits(inp) if hidden is None \
                            else self.runner.forward_logits(inp, hidden)
                sampling = [r for r in rows if r.samples]  # prompt chunks short of the end sample nothing
                if sampling:
                    meta = SamplingMetadata.from_rows(sampling)
                    if msg.token_bitmask is not None:  # structured outputs: this rank samples
                        meta.token_bitmask = msg.token_bitmask.rows_for([r.request_id for r in sampling])
                    with phase(timer, "sampling"):
                        out = self.sampler(logits, meta)
                else:
                    out = SamplerOutput([], [], [])
                out.prompt_logprobs = prompt_lps
                if timer is not None:
                    out.phases = timer.result()
        except BaseException:
            if not sent:  # the next stage waits for this batch: tell it that it failed
                send_to_next_stage(None, self.device)
            # Leave the state as before the message, so the engine may retry these rows.
            self.states.rollback(undo)
            raise
        self._applied[msg.seq] = undo
        while len(self._applied) > _UNDO_KEPT:
            self._applied.popitem(last=False)
        return out

    def rollback(self, seq: int) -> None:
        """Message `seq` succeeded here but failed elsewhere (another stage or rank): undo it."""
        undo = self._applied.pop(seq, None)
        if undo is not None:
            self.states.rollback(undo)


class UpstreamFailed(RuntimeError):
    """An earlier pipeline stage failed this batch; its own error is the one to report."""
