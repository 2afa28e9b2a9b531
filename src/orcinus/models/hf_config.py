"""Helpers for reading Hugging Face `config.json` dicts into `ModelConfig`s (each family has its
parser; these are the parts they share)."""
from __future__ import annotations


class UnsupportedModel(ValueError):
    """A checkpoint orcinus cannot run; the message says what is supported."""


def eos_ids(hf: dict) -> list[int]:
    eos = hf.get("eos_token_id")
    if eos is None:
        return []
    return list(eos) if isinstance(eos, (list, tuple)) else [int(eos)]


def sliding_window(hf: dict, model_type: str) -> tuple[int | None, frozenset[int]]:
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
