"""Engine settings, validated once.

Every field here is also a keyword argument of `LLM(...)` and a flag of the CLI with the same
name (underscores become dashes), so a user learns one vocabulary.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Literal

import torch

from orcinus.core.policies import POLICIES
from orcinus.errors import ConfigError  # noqa: F401  (re-exported: raised here)

SCHEDULER_POLICIES = tuple(POLICIES)  # orca, static, paged: named once, in core/policies.py
QUANTIZATION_MODES = ("auto", "gguf", "none")
DEFAULT_BATCHED_TOKENS_CPU = 512
DEFAULT_BATCHED_TOKENS_CUDA = 2048
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


@dataclass
class EngineConfig:
    model: str | None = None  # checkpoint folder or .gguf file; None means the default model
    tokenizer: str | None = None
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # paged: same throughput as orca when memory is plentiful, more when it binds (docs/benchmarks.md, "Memory")
    scheduler_policy: Literal["orca", "static", "paged"] = "paged"
    max_num_seqs: int = 32  # Orca's max_bs
    kv_cache_memory: int | None = None  # bytes for the KV pool; None: a default per device
    gpu_memory_utilization: float = 0.85  # on CUDA, fraction of free memory for the KV pool
    block_size: int = 16
    max_model_len: int | None = None  # None: the model's own context length
    n_workers: int = 1  # pipeline depth: how many batches may be in flight at once
    attention_backend: Literal["auto", "reference", "batched", "paged", "triton"] = "auto"
    # vLLM's name: no CUDA graphs, every iteration runs eagerly (graphs are always off on CPU)
    enforce_eager: bool = False
    seed: int = 0
    skip_tokenizer_init: bool = False
    trust_remote_code: bool = False
    max_num_batched_tokens: int | None = None  # token budget per iteration (None: per-device default)
    enable_prefix_caching: bool | None = None  # reuse cached KV of common prefixes; None: on for paged
    tensor_parallel_size: int = 1  # ranks that split every layer (worker processes on this machine)
    pipeline_parallel_size: int = 1  # stages of consecutive layers; batches in flight = max(n_workers, this)
    nnodes: int = 1  # machines sharing the ranks; the others run `python -m orcinus.distributed.launch`
    distributed_timeout_s: float = 120.0  # for ranks to join, and for one collective
    # Worker processes that complete no layer for this long while a batch is in flight are
    # stopped or stuck (SIGSTOP, a hung collective): the engine fails its requests and stops.
    worker_stall_timeout_s: float = 120.0
    # Sampling defaults for fields a request leaves unset: "auto" (the model's own, see
    # orcinus/generation_config.py), "vllm" (none: temperature 1, ...) or a folder with a
    # generation_config.json; the override (a JSON object, or a dict) changes single fields on top.
    generation_config: str = "auto"
    override_generation_config: str | dict | None = None
    # GGUF weights: "auto" keeps quantized tensors in their blocks on CPU when the quantized C kernel
    # builds (~file-size memory, faster decode; layers/quantized_linear.py), "gguf" insists on it
    # (CPU only), "none" dequantises them to `dtype` at load as before.
    quantization: Literal["auto", "gguf", "none"] = "auto"
    # The KV pool's element type (vLLM's flag name): "auto" is float16 for a float32 model whose
    # weights stay in GGUF blocks on CPU (executor/model_runner.resolve_kv_dtype says why), else the
    # model's dtype; on CPU float16 or bfloat16 halve a float32 model's pool (twice the tokens per
    # byte, half the bytes each decode reads). Other dtypes than the model's: CPU only.
    kv_cache_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # How idle OpenMP threads wait (orcinus/thread_policy.py): auto | spin | passive | spin:N. It
    # takes effect before torch loads (the CLI flag, ORCINUS_CPU_THREAD_POLICY); here it is checked
    # and reported on the start-up line.
    cpu_thread_policy: str = "auto"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if not _DEVICE.fullmatch(str(self.device)):
            raise ConfigError(f"device={self.device!r} is not supported; use auto, cpu, cuda or cuda:N")
        if self.scheduler_policy not in SCHEDULER_POLICIES:
            raise ConfigError(
                f"scheduler_policy={self.scheduler_policy!r} is unknown; choose one of {SCHEDULER_POLICIES}"
            )
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ConfigError(f"dtype={self.dtype!r} is unknown; choose auto or one of {tuple(DTYPES)}")
        if self.max_num_seqs < 1:
            raise ConfigError("max_num_seqs must be at least 1")
        if self.block_size < 1:
            raise ConfigError("block_size must be at least 1")
        if self.n_workers < 1:
            raise ConfigError("n_workers must be at least 1")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ConfigError("kv_cache_memory must be a positive number of bytes")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError("gpu_memory_utilization must be in (0, 1]")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ConfigError("max_model_len must be at least 2")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ConfigError("max_num_batched_tokens must be at least 1")
        if self.tensor_parallel_size < 1:
            raise ConfigError("tensor_parallel_size must be at least 1")
        if self.pipeline_parallel_size < 1:
            raise ConfigError("pipeline_parallel_size must be at least 1")
        world = self.tensor_parallel_size * self.pipeline_parallel_size
        if self.nnodes < 1 or world % self.nnodes:
            raise ConfigError(f"nnodes={self.nnodes} must divide tensor_parallel_size x pipeline_parallel_size "
                              f"= {world} (each node runs the same number of ranks)")
        if self.distributed_timeout_s <= 0:
            raise ConfigError("distributed_timeout_s must be positive")
        if self.worker_stall_timeout_s <= 0:
            raise ConfigError("worker_stall_timeout_s must be positive")
        if self.attention_backend not in ("auto", "reference", "batched", "paged", "triton"):
            raise ConfigError("attention_backend must be auto, reference, batched, paged or triton")
        if self.kv_cache_dtype != "auto" and self.kv_cache_dtype not in DTYPES:
            raise ConfigError(f"kv_cache_dtype={self.kv_cache_dtype!r} is unknown; choose auto or one of {tuple(DTYPES)}")
        if self.quantization not in QUANTIZATION_MODES:
            raise ConfigError(f"quantization={self.quantization!r} is unknown; choose one of {QUANTIZATION_MODES}")
        if not self.generation_config:
            raise ConfigError("generation_config must be 'auto', 'vllm' or a folder holding generation_config.json")
        from orcinus.generation_config import check_mode, parse_override
        from orcinus.thread_policy import ThreadPolicyError, check

        try:
            check(self.cpu_thread_policy)
        except ThreadPolicyError as exc:
            raise ConfigError(str(exc)) from None

        # Mistakes fail here, before a model loads, not after.
        check_mode(self.generation_config)
        parse_override(self.override_generation_config)

    def resolved_max_num_batched_tokens(self, device: torch.device) -> int:
        """The per-iteration token budget: decodes first, prompts fill the rest, longer ones in chunks.
        CPU: 512 (throughput measured equal to 1024, 2048 and no budget; the smallest bounds how
        long a newcomer's prompt stalls running requests). CUDA: 2048 (vLLM's online default;
        not measured here)."""
        if self.max_num_batched_tokens is not None:
            return self.max_num_batched_tokens
        return DEFAULT_BATCHED_TOKENS_CUDA if device.type == "cuda" else DEFAULT_BATCHED_TOKENS_CPU

    def resolved_prefix_caching(self) -> bool:
        if self.enable_prefix_caching is None:
            return self.scheduler_policy == "paged"
        return self.enable_prefix_caching

    # device="auto" and dtype="auto" are resolved on the executor side, where the model's path is
    # known: orcinus/executor/platform.py.

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]


@dataclass
class ModelConfig:
    """Architecture hyper-parameters, normalised across families (filled by the loader)."""

    architecture: str  # registry key: llama | qwen2 | qwen3 | mistral | gpt2 | opt
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    layer_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: bias on q/k/v
    qk_norm: bool = False  # Qwen3: RMSNorm on q and k per head
    hidden_act: str = "silu"
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    # OPT specifics
    do_layer_norm_before: bool = True
    word_embed_proj_dim: int | None = None
    position_offset: int = 0  # OPT's learned positions start at index 2
    extra: dict = field(default_factory=dict)
