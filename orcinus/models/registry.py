"""Which architectures orcinus runs, and how each reads a Hugging Face config.

A model family module provides a `nn.Module` class with `forward(input_ids, positions, ctx)`,
`compute_logits(hidden)` and `checkpoint_name(name)`, plus a config parser."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from orcinus.config import ModelConfig


class UnsupportedModel(ValueError):
    pass


@dataclass(frozen=True)
class Architecture:
    model_class: type[nn.Module]
    parse_config: Callable[[dict], ModelConfig]


def _eos_ids(hf: dict) -> list[int]:
    eos = hf.get("eos_token_id")
    if eos is None:
        return []
    return list(eos) if isinstance(eos, (list, tuple)) else [int(eos)]


def parse_llama_like(hf: dict) -> ModelConfig:
    model_type = hf.get("model_type", "llama")
    num_heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // num_heads
    sliding = hf.get("sliding_window") if model_type == "mistral" else None
    if model_type in ("qwen2", "qwen3") and not hf.get("use_sliding_window", False):
        sliding = None
    rope_theta = hf.get("rope_theta")
    rope_params = hf.get("rope_parameters") or {}
    if rope_theta is None:
        rope_theta = rope_params.get("rope_theta", 10000.0)
    scaling = hf.get("rope_scaling") or (rope_params if rope_params.get("rope_type", "default") != "default" else None)
    return ModelConfig(
        architecture=model_type,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=head_dim,
        intermediate_size=hf["intermediate_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope_theta),
        rope_scaling=scaling,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=bool(hf.get("attention_bias", model_type == "qwen2")),
        qk_norm=model_type == "qwen3",
        hidden_act=hf.get("hidden_act", "silu"),
        sliding_window=sliding,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=_eos_ids(hf),
    )


def _registry() -> dict[str, Architecture]:
    from orcinus.models.llama import LlamaForCausalLM

    reg = {name: Architecture(LlamaForCausalLM, parse_llama_like) for name in ("llama", "mistral", "qwen2", "qwen3")}
    try:
        from orcinus.models.gpt2 import GPT2LMHeadModel, parse_gpt2_config
        reg["gpt2"] = Architecture(GPT2LMHeadModel, parse_gpt2_config)
    except ImportError:
        pass
    try:
        from orcinus.models.opt import OPTForCausalLM, parse_opt_config
        reg["opt"] = Architecture(OPTForCausalLM, parse_opt_config)
    except ImportError:
        pass
    return reg


def supported_model_types() -> list[str]:
    return sorted(_registry())


def resolve(hf_config: dict) -> Architecture:
    model_type = hf_config.get("model_type")
    reg = _registry()
    if model_type not in reg:
        archs = hf_config.get("architectures") or []
        raise UnsupportedModel(
            f"model_type {model_type!r} (architectures {archs}) is not supported; orcinus runs: "
            f"{', '.join(supported_model_types())}"
        )
    return reg[model_type]
