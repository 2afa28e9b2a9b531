"""`orcinus serve | generate | chat | bench`: engine settings are flags named as `LLM(...)` keywords.

A mistake on the command line ends with one line, `error: <what to change>`, and exit status 2;
`--debug` (or ORCINUS_DEBUG=1) shows the traceback instead.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import struct
import sys
from typing import Any

from orcinus import thread_policy

# --cpu-thread-policy must reach the environment before orcinus.config imports torch (libgomp
# reads it once, at load); the parser validates and documents the same flag (engine/arg_utils.py).
thread_policy.apply_from_argv(sys.argv[1:])

from orcinus.config import EngineConfig  # noqa: E402,F401
# Engine flags live in one module, shared with `orcinus bench` and distributed.launch; re-exported.
from orcinus.engine.arg_utils import SMOLLM2_DEFAULTS as _SMOLLM2_DEFAULTS  # noqa: E402
from orcinus.engine.arg_utils import ENGINE_FLAG_HELP, add_engine_args, engine_config_from_args  # noqa: E402,F401

DEBUG_ENV = "ORCINUS_DEBUG"
BENCH_EXTRA = ("httpx", "matplotlib")  # pyproject.toml's `bench` extra
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
# max_tokens of a CLI reply when neither the user nor the model's generation config sets one.
CLI_DEFAULT_MAX_TOKENS = 512

class CLIError(Exception):
    """A user mistake found by the CLI itself; the message says what to change."""


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group(
        "sampling", "a flag left out takes the model's default (see --generation-config); for the default "
                    f"model: {_SMOLLM2_DEFAULTS}")
    g.add_argument("--max-tokens", type=int, default=None,
                   help=f"most tokens to generate (default: the model's max_new_tokens, else {CLI_DEFAULT_MAX_TOKENS})")
    g.add_argument("--temperature", type=float, default=None, help="0 is greedy (default: the model's, else 1)")
    g.add_argument("--top-p", type=float, default=None, help="(default: the model's, else 1)")
    g.add_argument("--top-k", type=int, default=None, help="-1: off (default: the model's, else off)")
    g.add_argument("--min-p", type=float, default=None, help="(default: the model's, else 0)")
    g.add_argument("--repetition-penalty", type=float, default=None, help="(default: the model's, else 1)")
    g.add_argument("--sampling-seed", type=int, default=None, help="per-request sampling seed")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def explicit_sampling(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling fields the user set on the command line, checked before the model loads."""
    from orcinus.sampling_params import SamplingParams

    given = {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p,
             "top_k": args.top_k, "min_p": args.min_p, "repetition_penalty": args.repetition_penalty,
             "seed": args.sampling_seed, "stop": args.stop}
    given = {k: v for k, v in given.items() if v is not None}
    SamplingParams(**given)  # a bad value fails now, not after a model load
    return given


def sampling_from_args(args: argparse.Namespace, engine) -> Any:
    """The user's flags over the model's defaults; the CLI's own max_tokens when neither sets one."""
    given = explicit_sampling(args)
    if "max_tokens" not in given and engine.generation_defaults.get("max_tokens") is None:
        given["max_tokens"] = CLI_DEFAULT_MAX_TOKENS
    return engine.default_sampling_params(**given)


def _load_llm(cfg: EngineConfig):
    from orcinus.engine.llm import LLM

    return LLM(**dataclasses.asdict(cfg))


def _cmd_generate(args: argparse.Namespace) -> int:
    cfg = engine_config_from_args(args)
    explicit_sampling(args)
    prompts = args.prompt or ([] if sys.stdin.isatty() else [line.rstrip("\n") for line in sys.stdin if line.strip()])
    if not prompts:
        raise CLIError("give --prompt TEXT (repeatable) or prompts on standard input, one per line")
    llm = _load_llm(cfg)
    params = sampling_from_args(args, llm.engine)
    outs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params) if args.chat_template \
        else llm.generate(prompts, params)
    for out in outs:
        if len(outs) > 1:
            print(f"### {out.prompt!r}")
        print(out.outputs[0].text)
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    from orcinus.engine.chat_session import run_interactive_chat

    cfg = engine_config_from_args(args)
    given = explicit_sampling(args)
    llm = _load_llm(cfg)
    if "max_tokens" not in given and llm.engine.generation_defaults.get("max_tokens") is None:
        given["max_tokens"] = CLI_DEFAULT_MAX_TOKENS
    return run_interactive_chat(cfg, given, args.system, engine=llm.engine)


def _add_common(parser: argparse.ArgumentParser, top: bool = False) -> None:
    # On the top parser and on each command, so `orcinus generate ... --debug` works too; the
    # command's copy leaves the top one's value alone unless given (SUPPRESS).
    parser.add_argument("--debug", action="store_true", default=False if top else argparse.SUPPRESS,
                        help=f"show the traceback of an error (also ${DEBUG_ENV}=1)")
    parser.add_argument("--log-level", default="INFO" if top else argparse.SUPPRESS,
                        help="DEBUG | INFO | WARNING | ERROR (default: INFO)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="orcinus", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_common(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate completions for prompts, offline")
    gen.add_argument("--prompt", action="append", help="prompt text (repeatable); else lines of stdin")
    gen.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=True,
                     help="wrap each prompt as a user message in the model's chat template")
    add_engine_args(gen)
    add_sampling_args(gen)
    _add_common(gen)
    gen.set_defaults(func=_cmd_generate)

    chat = sub.add_parser("chat", help="interactive chat in the terminal, streaming tokens")
    chat.add_argument("--system", default=None, help="system message")
    add_engine_args(chat)
    add_sampling_args(chat)
    _add_common(chat)
    chat.set_defaults(func=_cmd_chat)

    try:
        from orcinus.server.app import add_serve_args, run_server

        serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
        add_engine_args(serve)
        add_serve_args(serve)
        _add_common(serve)
        serve.set_defaults(func=lambda a: run_server(engine_config_from_args(a), a))
    except ImportError:
        pass
    try:
        from orcinus.bench.cli import add_bench_subparsers

        bench = sub.add_parser("bench", help="benchmarks: offline, serve, sweep")
        add_bench_subparsers(bench.add_subparsers(dest="bench_command", required=True))
    except ImportError:
        pass
    return parser


def user_error_message(exc: BaseException, args: argparse.Namespace) -> str | None:
    """One line saying what to change, for the errors a user can cause; None for our own bugs."""
    from orcinus.errors import (ConfigError, ModelNotFound, RequestRejected, SamplingParamsError,
                                TokenizerNotFound)
    from orcinus.models.registry import UnsupportedModel

    text = " ".join(str(exc).split())  # one line, whatever the message holds
    if isinstance(exc, SamplingParamsError) and exc.param:
        flag = "--" + exc.param.replace("_", "-")
        if exc.param == "seed":
            flag = "--sampling-seed"
        return f"{flag}: {text}"
    if isinstance(exc, RequestRejected) and exc.param == "prompt":
        return f"--prompt: {text}"
    if isinstance(exc, (CLIError, ConfigError, ModelNotFound, UnsupportedModel, TokenizerNotFound, RequestRejected,
                        SamplingParamsError)):
        return text
    if isinstance(exc, ModuleNotFoundError) and exc.name in BENCH_EXTRA:
        return f"`orcinus bench` needs {exc.name}: pip install 'orcinus[bench]' (or -e '.[bench]' in a clone)"
    model = getattr(args, "model", None) or "the default model"
    if isinstance(exc, (struct.error, EOFError)):
        return (f"cannot load {model}: the file ends early or is corrupt ({text or type(exc).__name__}); "
                "download it again")
    if isinstance(exc, UnicodeDecodeError) or (
            isinstance(exc, (ValueError, OSError, KeyError)) and _while_loading(exc)):
        return (f"cannot load {model}: {text or type(exc).__name__}; check that the file is a complete, "
                "uncorrupted checkpoint (download it again if in doubt)")
    if isinstance(exc, ValueError):
        return text
    return None


def _while_loading(exc: BaseException) -> bool:
    """Whether the error was raised in the model or tokenizer loading code."""
    tb = exc.__traceback__
    while tb is not None:
        name = tb.tb_frame.f_globals.get("__name__", "")
        if name.startswith(("orcinus.models.", "gguf", "safetensors", "orcinus.tokenizer", "transformers")):
            return True
        tb = tb.tb_next
    return False


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    # the arguments as given: benchmark reports keep them, so that `bench validate-sim` can run
    # the same command again on the simulated executor
    args.argv = argv
    args.root_parser = parser  # `bench validate-sim` parses the commands it runs again with it
    debug = bool(getattr(args, "debug", False)) or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    level = str(getattr(args, "log_level", "INFO")).upper()
    logging.basicConfig(level=getattr(logging, level, logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        if debug:
            raise
        message = user_error_message(exc, args)
        if message is None:
            print(f"error: internal error: {type(exc).__name__}: {' '.join(str(exc).split())} "
                  f"(run again with --debug for the traceback, and please report it)", file=sys.stderr)
            return 1
        print(f"error: {message}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
