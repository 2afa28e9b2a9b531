"""Which architectures orcinus runs: HF `model_type` -> (model class, config parser).

A family is a `CausalLM` (orcinus/models/causal_lm.py) in a module of its own; adding one is a
row here."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from orcinus.config import ModelConfig
from orcinus.models.gpt2 import GPT2LMHeadModel, parse_gpt2_config
from orcinus.models.hf_config import UnsupportedModel
from orcinus.models.llama import LlamaForCausalLM, parse_llama_config
from orcinus.models.opt import OPTForCausalLM, parse_opt_config

__all__ = ["Architecture", "UnsupportedModel", "resolve", "supported_model_types"]


@dataclass(frozen=True)
class Architecture:
    model_class: type[nn.Module]
    parse_config: Callable[[dict], ModelConfig]


REGISTRY: dict[str, Architecture] = {
    "llama": Architecture(LlamaForCausalLM, parse_llama_config),
    "mistral": Architecture(LlamaForCausalLM, parse_llama_config),
    "qwen2": Architecture(LlamaForCausalLM, parse_llama_config),
    "qwen3": Architecture(LlamaForCausalLM, parse_llama_config),
    "gpt2": Architecture(GPT2LMHeadModel, parse_gpt2_config),
    "opt": Architecture(OPTForCausalLM, parse_opt_config),
}


def supported_model_types() -> list[str]:
    return sorted(REGISTRY)


def resolve(hf_config: dict) -> Architecture:
    model_type = hf_config.get("model_type")
    if model_type not in REGISTRY:
        archs = hf_config.get("architectures") or []
        raise UnsupportedModel(
            f"model_type {model_type!r} (architectures {archs}) is not supported; orcinus runs: "
            f"{', '.join(supported_model_types())}"
        )
    return REGISTRY[model_type]
