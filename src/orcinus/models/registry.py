"""Which architectures orcinus runs, and how each reads a Hugging Face config.

A model family module provides a `nn.Module` class with `forward(input_ids, positions, ctx)`,
`compute_logits(hidden)` and `checkpoint_name(name)`, plus a config parser."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from orcinus.config import ModelConfig
from orcinus.layers.rotary import UnsupportedRopeScaling, check_rope_scaling


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


def _sliding_window(hf: dict, model_type: str) -> tuple[int | None, frozenset[int]]:
    """(window size, layers that attend to the whole context anyway).

    Mistral slides in every layer. Qwen2/Qwen3 slide only with `use_sliding_window`, and then only
    in layers from `max_window_layers` on (transformers' rule); a config that lists `layer_types`
    says per layer. Every layer of a model with no window attends to everything.
    """
    num_layers = hf["num_hidden_layers"]
    window = hf.get("sliding_window")
    if model_type in ("qwen2", "qwen3") and not hf.get("use_sliding_window", False):
        window = None
    elif model_type not in ("mistral", "qwen2", "qwen3"):
        window = None
    if window is None:
        return None, frozenset(range(num_layers))
    layer_types = hf.get("layer_types")
    if layer_types is None:
        first = hf.get("max_window_layers", 0) if model_type in ("qwen2", "qwen3") else 0
        layer_types = ["sliding_attention" if i >= first else "full_attention" for i in range(num_layers)]
    unknown = set(layer_types) - {"sliding_attention", "full_attention"}
    if unknown or len(layer_types) != num_layers:
        raise UnsupportedModel(
            f"layer_types {sorted(unknown) or layer_types} are not supported; orcinus runs "
            "'full_attention' and 'sliding_attention' layers, one entry per layer"
        )
    return int(window), frozenset(i for i, t in enumerate(layer_types) if t == "full_attention")


def parse_llama_like(hf: dict) -> ModelConfig:
    model_type = hf.get("model_type", "llama")
    num_heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // num_heads
    sliding, full_layers = _sliding_window(hf, model_type)
    rope_theta = hf.get("rope_theta")
    rope_params = hf.get("rope_parameters") or {}
    if rope_theta is None:
        rope_theta = rope_params.get("rope_theta", 10000.0)
    scaling = hf.get("rope_scaling") or (rope_params if rope_params.get("rope_type", "default") != "default" else None)
    try:
        check_rope_scaling(scaling)
    except UnsupportedRopeScaling as e:
        raise UnsupportedModel(str(e)) from e
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
        extra={"full_attention_layers": full_layers},
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
