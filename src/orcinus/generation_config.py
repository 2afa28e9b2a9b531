"""A model's recommended sampling defaults, and where they came from.

A request (or a CLI run) that leaves a sampling field unset takes the model's default for it, as
vLLM does with `--generation-config auto`. The defaults are found, first hit wins:

1. `generation_config.json` in the checkpoint folder (or beside a `.gguf` file);
2. a GGUF file's `general.sampling.*` metadata (llama.cpp's names for the same settings);
3. a built-in entry for a model whose authors publish their settings only in its model card
   (SmolLM2-135M-Instruct, the default model, whose generation_config.json sets none).

`--generation-config vllm` ignores all of these (vLLM's name for "the engine's own defaults":
temperature 1, top_p 1, ...), a folder reads that folder's generation_config.json, and
`--override-generation-config '{"temperature": 0.5}'` changes single fields on top.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from orcinus.errors import ConfigError

# generation_config.json key -> SamplingParams field (the keys vLLM honours, with its mapping).
HF_KEYS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}
# GGUF general.sampling.* key -> SamplingParams field.
GGUF_KEYS = {
    "general.sampling.temp": "temperature",
    "general.sampling.top_p": "top_p",
    "general.sampling.top_k": "top_k",
    "general.sampling.min_p": "min_p",
    "general.sampling.penalty_repeat": "repetition_penalty",
}
# What --override-generation-config may set: the HF names and the SamplingParams names.
OVERRIDABLE = {**HF_KEYS, **{v: v for v in HF_KEYS.values()}}

# Models that publish their sampling settings only in the model card. Keyed by the file or folder
# name up to its first dot, lower-case (SmolLM2-135M-Instruct.Q4_1.gguf -> smollm2-135m-instruct).
BUILTIN: dict[str, tuple[dict[str, Any], str]] = {
    "smollm2-135m-instruct": (
        {"temperature": 0.2, "top_p": 0.9},
        # Its card's example: model.generate(inputs, temperature=0.2, top_p=0.9, do_sample=True).
        "the model card of HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}

GENERATION_CONFIG_FILE = "generation_config.json"


class GenerationConfigError(ConfigError):
    """A generation config that cannot be used; the message says what to change."""


@dataclass(frozen=True)
class GenerationDefaults:
    """SamplingParams field -> the model's default, and a sentence on where they come from."""

    values: Mapping[str, Any] = field(default_factory=dict)
    source: str = "none (the engine's own defaults)"

    def get(self, name: str, fallback: Any = None) -> Any:
        return self.values.get(name, fallback)

    def describe(self) -> str:
        shown = " ".join(f"{k}={v}" for k, v in sorted(self.values.items())) or "none"
        return f"{shown} (from {self.source})"

    def sampling_params(self, **explicit: Any):
        """SamplingParams with what the caller set (None means unset) over the model's defaults."""
        from orcinus.sampling_params import SamplingParams

        chosen = {k: v for k, v in self.values.items()}
        chosen.update({k: v for k, v in explicit.items() if v is not None})
        return SamplingParams(**chosen)


_INT_FIELDS = ("top_k", "max_tokens")


def _plain(values: Mapping[str, Any]) -> dict[str, Any]:
    """Python numbers (GGUF metadata holds numpy scalars); ints where SamplingParams wants them."""
    out: dict[str, Any] = {}
    for k, v in values.items():
        if isinstance(v, (int, float)) or hasattr(v, "item"):
            v = v.item() if hasattr(v, "item") else v
            v = int(v) if k in _INT_FIELDS and float(v).is_integer() else v
        out[k] = v
    return out


def _from_hf(data: Mapping[str, Any]) -> dict[str, Any]:
    values = {HF_KEYS[k]: v for k, v in data.items() if k in HF_KEYS and v is not None}
    if data.get("do_sample") is False:
        # transformers decodes greedily when do_sample is false, whatever temperature says: what
        # the authors ran is greedy decoding.
        values = {k: v for k, v in values.items() if k not in ("temperature", "top_p", "top_k", "min_p")}
        values["temperature"] = 0.0
    return values


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise GenerationConfigError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise GenerationConfigError(f"{path} does not hold a JSON object")
    return data


def _folder_of(model_path: str) -> str:
    return os.path.dirname(os.path.abspath(model_path)) if os.path.isfile(model_path) else model_path


def _auto(model_path: str, gguf_metadata: Mapping[str, Any] | None) -> GenerationDefaults:
    cfg = os.path.join(_folder_of(model_path), GENERATION_CONFIG_FILE)
    if os.path.isfile(cfg):
        values = _from_hf(_read_json(cfg))
        if values:
            return GenerationDefaults(values, cfg)
    if gguf_metadata:
        values = {name: gguf_metadata[key] for key, name in GGUF_KEYS.items() if gguf_metadata.get(key) is not None}
        if values:
            return GenerationDefaults(values, f"the GGUF metadata of {model_path}")
    stem = os.path.basename(os.path.normpath(model_path)).split(".")[0].lower()
    if stem in BUILTIN:
        values, source = BUILTIN[stem]
        return GenerationDefaults(dict(values), source)
    return GenerationDefaults({}, f"none found for {model_path} (the engine's own defaults)")


def parse_override(value: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """The override as SamplingParams fields; accepts a JSON object text (the CLI) or a dict."""
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise GenerationConfigError(
                f"override_generation_config is not valid JSON ({exc.msg}); give an object such as "
                "'{\"temperature\": 0.5}'") from exc
    if not isinstance(value, Mapping):
        raise GenerationConfigError("override_generation_config must be a JSON object such as '{\"temperature\": 0.5}'")
    unknown = sorted(set(value) - set(OVERRIDABLE))
    if unknown:
        raise GenerationConfigError(
            f"override_generation_config has unknown keys {unknown}; known: {sorted(OVERRIDABLE)}")
    return {OVERRIDABLE[k]: v for k, v in value.items()}


def check_mode(mode: str) -> str:
    """Refuse a generation_config setting that names nothing; returns the file a folder names."""
    if mode in ("auto", "vllm"):
        return ""
    cfg = os.path.join(os.path.expanduser(mode), GENERATION_CONFIG_FILE)
    if not os.path.isfile(cfg):
        raise GenerationConfigError(
            f"generation_config={mode!r}: no {GENERATION_CONFIG_FILE} there; give 'auto', 'vllm' or a "
            "folder that holds one")
    return cfg


def load_generation_defaults(mode: str, model_path: str, override: str | Mapping[str, Any] | None = None,
                             gguf_metadata: Mapping[str, Any] | None = None) -> GenerationDefaults:
    """mode: 'auto' (the model's own), 'vllm' (none), or a folder holding generation_config.json."""
    if mode == "vllm":
        found = GenerationDefaults({}, "none: --generation-config vllm (the engine's own defaults)")
    elif mode == "auto":
        found = _auto(model_path, gguf_metadata)
    else:
        cfg = check_mode(mode)
        found = GenerationDefaults(_from_hf(_read_json(cfg)), cfg)
    extra = parse_override(override)
    values = _plain({**found.values, **extra})
    source = found.source if not extra else f"{found.source}, overridden by override_generation_config"
    defaults = GenerationDefaults(values, source)
    try:
        defaults.sampling_params()  # every value must be one a request could set
    except (ValueError, TypeError) as exc:
        raise GenerationConfigError(f"the generation defaults {dict(values)} are invalid ({source}): {exc}") from exc
    return defaults
