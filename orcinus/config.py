"""Engine settings, validated once.

Every field here is also a keyword argument of `LLM(...)` and a flag of the CLI with the same
name (underscores become dashes), so a user learns one vocabulary.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import torch

SCHEDULER_POLICIES = ("orca", "static")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ConfigError(ValueError):
    """A setting that cannot work; the message says what to change."""


@dataclass
class EngineConfig:
    model: str | None = None  # checkpoint folder or .gguf file; None means the default model
    tokenizer: str | None = None
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    scheduler_policy: Literal["orca", "static"] = "orca"
    max_num_seqs: int = 32  # Orca's max_bs
    kv_cache_memory: int | None = None  # bytes for the KV pool; None: a default per device
    gpu_memory_utilization: float = 0.85  # on CUDA, fraction of free memory for the KV pool
    block_size: int = 16
    max_model_len: int | None = None  # None: the model's own context length
    n_workers: int = 1  # pipeline depth: how many batches may be in flight at once
    attention_backend: Literal["auto", "reference", "batched", "triton"] = "auto"
    seed: int = 0
    skip_tokenizer_init: bool = False
    trust_remote_code: bool = False
    max_num_batched_tokens: int | None = None  # optional cap on tokens per iteration
    tensor_parallel_size: int = 1  # ranks that split every layer (worker processes on this machine)
    pipeline_parallel_size: int = 1  # stages of consecutive layers; batches in flight = max(n_workers, this)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
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
        if self.attention_backend not in ("auto", "reference", "batched", "triton"):
            raise ConfigError("attention_backend must be auto, reference, batched or triton")

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dev = torch.device(self.device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device={self.device!r} was asked for but CUDA is not available; use device='cpu'")
        return dev

    def resolved_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype == "auto":
            if device.type == "cuda":
                return torch.bfloat16
            from orcinus.cpu_features import auto_cpu_dtype
            return auto_cpu_dtype(self.model).dtype
        return DTYPES[self.dtype]

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
