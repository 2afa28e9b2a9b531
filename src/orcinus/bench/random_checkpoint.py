"""Random-weight checkpoints of real architectures, for benchmarks where no model hub is reachable.

`orcinus bench random-checkpoint qwen3-0.6b DIR` writes a Hugging Face folder (config.json and
safetensors) with the named model's exact shapes and random weights. Speed depends on shapes, not
on weight values, so such a folder stands in for the real model in `bench offline` / `bench sweep`
(prompts are then random token ids: no tokenizer is written, benchmarks skip it). `--override
key=value` changes config fields, e.g. fewer layers for a quick run.

The shapes are copied from the models' published config.json files (facts, not code).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

# name -> (transformers config class, config fields)
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen3-0.6b": ("Qwen3Config", dict(
        hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960,
        rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_act="silu",
        bos_token_id=151643, eos_token_id=151645)),
    "llama-3-8b": ("LlamaConfig", dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=False, hidden_act="silu",
        bos_token_id=128000, eos_token_id=128001)),
    "smollm2-135m": ("LlamaConfig", dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=True, hidden_act="silu", bos_token_id=1, eos_token_id=2)),
}


class BadOverride(ValueError):
    """An --override that is not key=value or names no field of the preset's config."""


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """key=value pairs; values are read as JSON (numbers, true/false, null) or else kept as text."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise BadOverride(f"--override {item!r}: expected key=value, e.g. num_hidden_layers=2")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def write_random_checkpoint(preset: str, folder: str | Path, overrides: dict[str, Any] | None = None,
                            dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Path:
    """Write the preset's architecture with random weights (transformers' own initialisation) to
    `folder`; returns it. Refuses an unknown preset or an override naming no config field."""
    import transformers

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    config_class, fields = PRESETS[preset]
    config_cls = getattr(transformers, config_class)
    known = set(config_cls().to_dict())
    unknown = sorted(set(overrides or {}) - known)
    if unknown:
        raise BadOverride(f"{config_class} has no field {', '.join(map(repr, unknown))}")
    config = config_cls(**{**fields, **(overrides or {})})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    return folder


def main_random_checkpoint(preset: str, folder: str, overrides: list[str], dtype: str, seed: int) -> int:
    started = time.monotonic()
    params = parse_overrides(overrides)
    path = write_random_checkpoint(preset, folder, params, getattr(torch, dtype), seed)
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    print(f"wrote {preset} with random weights ({dtype}, {size / 2**30:.2f} GiB) to {path} "
          f"in {time.monotonic() - started:.0f} s")
    return 0
