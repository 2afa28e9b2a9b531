"""`orcinus bench offline | serve | sweep | bf16 | random-checkpoint`: flags and handlers (the work lives in sibling files)."""
from __future__ import annotations

import argparse
import json
import logging
import math
import os

from orcinus.bench.arrivals import ARRIVAL_MODES, parse_rate, with_arrivals
from orcinus.bench.trace_builder import add_trace_args, build_trace, trace_spec_from_args
from orcinus.engine.arg_utils import add_engine_args, engine_config_from_args
from orcinus.executor.platform import resolve_device, resolve_for_config

logger = logging.getLogger(__name__)

def add_bench_subparsers(sub: argparse._SubParsersAction) -> None:
    _add_offline(sub)
    _add_serve(sub)
    _add_sweep(sub)
    _add_bf16(sub)
    _add_random_checkpoint(sub)
    from orcinus.bench.sim_validate import add_validate_sim_parser

    add_validate_sim_parser(sub)
    from orcinus.sim.cli import add_sim_subparsers

    add_sim_subparsers(sub)


def _add_random_checkpoint(sub: argparse._SubParsersAction) -> None:
    from orcinus.bench.random_checkpoint import PRESETS

    p = sub.add_parser("random-checkpoint", help="write a Hugging Face folder with a real model's shapes and "
                                                 "random weights (benchmarks without a model hub)")
    p.add_argument("preset", choices=sorted(PRESETS), help="whose shapes")
    p.add_argument("folder", help="where to write config.json and the safetensors")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="change a config field, e.g. --override num_hidden_layers=4 (repeatable)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_random_checkpoint)


def _cmd_random_checkpoint(args: argparse.Namespace) -> int:
    from orcinus.bench.random_checkpoint import main_random_checkpoint

    return main_random_checkpoint(args.preset, args.folder, args.override, args.dtype, args.seed)


def _add_bf16(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bf16", help="float32 vs bfloat16 on CPU: speed and greedy agreement on reference prompts; "
                                    "stores the verdict that dtype=auto follows")
    p.add_argument("--model", default=None, help="checkpoint folder or .gguf file (default: the default model)")
    p.add_argument("--max-tokens", type=int, default=32, help="greedy tokens per reference prompt")
    p.set_defaults(func=_cmd_bf16)


def _cmd_bf16(args: argparse.Namespace) -> int:
    from orcinus.bench.bf16_check import check_bf16, verdict_path

    v = check_bf16(args.model, max_tokens=args.max_tokens)
    print(f"model: {v.model}\ncpu: {v.cpu}\nfloat32: {v.float32_tok_s:.1f} tok/s, bfloat16: {v.bfloat16_tok_s:.1f} "
          f"tok/s\ngreedy agreement: {v.agreeing_prompts}/{v.prompts} prompts\n"
          f"dtype=auto on this CPU will use: {'bfloat16' if v.use_bf16 else 'float32'}\n"
          f"verdict stored in {verdict_path(v.model, v.cpu)}")
    return 0


def _quiet_http_logs() -> None:
    # httpx logs every request at INFO: thousands of lines that would bury the report.
    logging.getLogger("httpx").setLevel(logging.WARNING)


def rerun_argv(args: argparse.Namespace) -> list[str] | None:
    """The command's arguments after `orcinus` (["bench", "offline", ...]), as parsed by the CLI."""
    argv = getattr(args, "argv", None)
    return list(argv) if argv is not None else None


def _rates(text: str) -> list[float]:
    return [parse_rate(t) for t in text.replace(",", " ").split()]


def _progress_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")


# ---------------------------------------------------------------------------------------- offline
def _add_offline(sub: argparse._SubParsersAction) -> None:
    from orcinus.bench.offline import BACKENDS, DEFAULT_BACKENDS

    p = sub.add_parser("offline", help="one trace through orcinus (orca, static) and transformers (generate, "
                                       "continuous batching): output tokens/s and the physical floor")
    p.add_argument("--backends", default=",".join(DEFAULT_BACKENDS),
                   help=f"comma-separated subset of {','.join(BACKENDS)}")
    p.add_argument("--kv-plot", default=None, help="PNG of KV utilisation over time of the orcinus backends")
    p.add_argument("--lengths-known", action=argparse.BooleanOptionalAction, default=True,
                   help="orcinus backends: requests give max_tokens = their output length (default); with "
                        "--no-lengths-known they give none and end at their length unforeseen, like EOS")
    p.add_argument("--floor", action=argparse.BooleanOptionalAction, default=True,
                   help="measure the device and report throughput as a percentage of the trace's floor")
    p.add_argument("--output-json", default=None, help="write the report here")
    p.add_argument("--profile", action="store_true",
                   help="time each phase of orcinus' iterations (scheduling, input preparation, forward, "
                        "sampling, output processing) and print the per-iteration breakdown")
    p.add_argument("--detokenize", action="store_true",
                   help="orcinus backends: load the tokenizer and detokenise every output token, as a server does")
    _progress_flag(p)
    from orcinus.sim.cli import add_simulate_flag

    add_simulate_flag(p)
    from orcinus.bench.peers import add_peer_args

    add_peer_args(p)  # --mode single, --vllm-python, ... (orcinus/bench/peers.py)
    add_trace_args(p, default_dataset="random", with_seed=False)
    add_engine_args(p)
    p.set_defaults(func=_cmd_offline)


def _cmd_offline(args: argparse.Namespace) -> int:
    from orcinus.bench.offline import OfflineReport, run_offline
    from orcinus.bench.report import command_line, load_average, machine_info, write_json
    from orcinus.bench.workloads import trace_summary

    config = engine_config_from_args(args)
    spec = trace_spec_from_args(args)
    if args.simulate:  # no model to resolve: a shape preset needs no checkpoint
        from orcinus.sim.bench_hooks import sim_trace

        trace = sim_trace(spec, config.model)
        device, resolved = "simulated", ""
    else:
        trace = build_trace(spec, config.model)
        resolved_device, resolved_dtype = resolve_for_config(config)
        device, resolved = str(resolved_device), str(resolved_dtype).removeprefix("torch.")
    settings = {"model": config.model or "default (SmolLM2-135M-Instruct GGUF)", "dtype": config.dtype,
                "resolved_dtype": resolved,
                "device": device, "max_num_seqs": config.max_num_seqs, "kv_cache_memory": config.kv_cache_memory,
                "trace": spec.describe(), "detokenize": args.detokenize}
    report = OfflineReport(settings, trace_summary(trace), machine_info(device), command_line())
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    from orcinus.bench.peers import peer_settings_from_args

    from orcinus.thread_policy import applied

    report.settings["mode"] = args.mode
    # what `bench validate-sim` needs to run this trace again on the simulated executor
    report.settings["rerun_argv"] = rerun_argv(args)
    report.settings["cpu_thread_policy"] = applied().describe()
    if args.simulate:
        from orcinus.sim.bench_hooks import run_offline_simulated

        run_offline_simulated(config, args.simulate, trace, backends, report, args.lengths_known, args.floor)
    else:
        run_offline(config, trace, backends, report, progress=args.progress, with_floor=args.floor and args.mode == "batch",
                    lengths_known=args.lengths_known, profile=args.profile, detokenize=args.detokenize,
                    mode=args.mode, peers=peer_settings_from_args(args))
    report.machine["load_avg_1m_end"] = load_average()
    print(report.to_markdown())
    if args.kv_plot:
        from orcinus.bench.kv_usage import KVSample, plot_kv_utilisation

        series = {r.backend: [KVSample(**x) for x in r.kv_samples] for r in report.results if r.kv_samples}
        plot_kv_utilisation(series, args.kv_plot, f"{spec.dataset}, {len(trace)} requests, KV pool "
                                                  f"{config.kv_cache_memory or 'default'} bytes")
        print(f"plot written to {args.kv_plot}")
    if args.output_json:
        write_json(args.output_json, report)
        print(f"report written to {args.output_json}")
    return 0 if all(r.status == "ok" or r.status.startswith("n/a") for r in report.results) else 1


# ---------------------------------------------------------------------------------------- serve
def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="load generator against any OpenAI-compatible /v1/completions endpoint")
    p.add_argument("--base-url", default=None, help="server root, e.g. http://127.0.0.1:8000 (default from --host/--port)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None, help="the request's `model` (default: first of /v1/models)")
    p.add_argument("--tokenizer", default=None,
                   help="model folder or .gguf whose vocabulary/tokenizer builds the prompts (default: the default model)")
    p.add_argument("--request-rate", type=parse_rate, default=math.inf, help="requests/s, or inf (default): all at once")
    p.add_argument("--arrival", choices=ARRIVAL_MODES, default="poisson",
                   help="arrival process at --request-rate (default poisson)")
    p.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight at once")
    p.add_argument("--goodput", nargs="+", default=None, metavar="NAME:MS",
                   help="SLOs for goodput, e.g. ttft:500 tpot:100 (names: ttft tpot e2el normalized_latency)")
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="send vLLM's ignore_eos so every request generates its full output length")
    p.add_argument("--extra-body", default=None, help="JSON object merged into every request body")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    p.add_argument("--result-json", default=None, help="write the report here")
    p.add_argument("--save-detailed", action="store_true", help="include every request's timings in the JSON")
    p.add_argument("--scrape-metrics", type=float, default=None, metavar="SECONDS",
                   help="poll the server's /metrics every SECONDS during the run and report its KV use (mean "
                        "running sequences, KV utilisation, preemptions, prefix-cache hits); orcinus servers only")
    _progress_flag(p)
    add_trace_args(p, default_dataset="orca")
    p.set_defaults(func=_cmd_serve)


def _cmd_serve(args: argparse.Namespace) -> int:
    from orcinus.bench.client import EndpointConfig
    from orcinus.bench.load_generator import run_load
    from orcinus.bench.metrics import parse_slos
    from orcinus.bench.report import command_line, machine_info, write_json
    from orcinus.bench.serve_report import ServeReport
    from orcinus.bench.workloads import trace_summary

    _quiet_http_logs()
    base_url = args.base_url or f"http://{args.host}:{args.port}"
    slos = parse_slos(args.goodput)
    spec = trace_spec_from_args(args)
    trace = with_arrivals(build_trace(spec, args.tokenizer), args.request_rate, args.arrival, args.seed)
    extra = json.loads(args.extra_body) if args.extra_body else {}
    ep = EndpointConfig(base_url, args.served_model_name or "", args.ignore_eos, args.api_key, extra)
    if args.scrape_metrics is not None and not args.scrape_metrics > 0:
        raise ValueError("--scrape-metrics must be a positive number of seconds")
    run = run_load(trace, ep, args.max_concurrency, slos, args.progress, metrics_interval_s=args.scrape_metrics)
    settings = {"base_url": base_url, "model": ep.model, "request_rate": args.request_rate, "arrival": args.arrival,
                "max_concurrency": args.max_concurrency, "ignore_eos": args.ignore_eos, "trace": spec.describe(),
                "prompt_format": "text" if spec.dataset == "sharegpt" else "token ids"}
    report = ServeReport.from_run(run, settings, trace_summary(trace), machine_info(), command_line(),
                                  args.save_detailed)
    print(report.summary())
    if args.result_json:
        write_json(args.result_json, report)
        print(f"report written to {args.result_json}")
    return 0 if run.metrics.failed == 0 else 1


# ---------------------------------------------------------------------------------------- sweep
def _add_sweep(sub: argparse._SubParsersAction) -> None:
    from orcinus.bench.sweep import DEFAULT_CONFIGS

    p = sub.add_parser("sweep", help="configurations x request rates; draws the paper's Figure 10")
    p.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS),
                   help="each POLICY:MAX_NUM_SEQS, 'LABEL=ENGINE FLAGS', or a `bench offline` backend (orca, "
                        "paged, paged-chunked, ...: a budget every prompt fits in (2048 on CPU, 8192 on CUDA), or "
                        "512 / --max-num-batched-tokens for -chunked) (default: %(default)s)")
    p.add_argument("--rates", type=_rates, default=[0.5, 1.0, 2.0, 4.0], help="request rates, e.g. '0.5,1,2,inf'")
    p.add_argument("--arrival", choices=ARRIVAL_MODES, default="poisson")
    p.add_argument("--target", choices=("server", "engine"), default="server",
                   help="server: start `orcinus serve` per config and load it over HTTP; engine: replay in-process")
    p.add_argument("--max-concurrency", type=int, default=None, help="(server target) most requests in flight")
    p.add_argument("--goodput", nargs="+", default=None, metavar="NAME:MS")
    p.add_argument("--lengths-known", action=argparse.BooleanOptionalAction, default=True,
                   help="(engine target) requests give max_tokens = their output length (default); with "
                        "--no-lengths-known they give none and end at their length unforeseen, like EOS")
    p.add_argument("--kv-plot", default=None,
                   help="PNG of KV utilisation over time, one line per config and rate (engine target: every "
                        "iteration; server target: the server's /metrics, polled every 0.5 s)")
    p.add_argument("--output-dir", default="bench_results/sweep", help="sweep.json, sweep.md and figure10.png go here")
    p.add_argument("--title", default="", help="plot title")
    _progress_flag(p)
    from orcinus.sim.cli import add_simulate_flag

    add_simulate_flag(p)
    add_trace_args(p, default_dataset="orca", with_seed=False)
    add_engine_args(p)
    p.set_defaults(func=_cmd_sweep)


def _cmd_sweep(args: argparse.Namespace) -> int:
    from orcinus.bench.figure import memory_table, plot_figure10, sweep_table
    from orcinus.bench.metrics import parse_slos
    from orcinus.bench.report import command_line, load_average, machine_info, write_json
    from orcinus.bench.budgets import unchunked_budget
    from orcinus.bench.sweep import parse_config, sweep_engine, sweep_server
    from orcinus.bench.workloads import trace_summary

    _quiet_http_logs()
    if args.simulate:
        args.target = "engine"  # the simulated executor runs in this process
    if args.target == "server" and not args.lengths_known:
        # the unforeseen end needs the engine in this process
        raise ValueError("--no-lengths-known needs --target engine")
    base = engine_config_from_args(args)
    spec = trace_spec_from_args(args)
    if args.simulate:
        from orcinus.sim.bench_hooks import sim_trace, simulate_sweep_config

        trace = sim_trace(spec, base.model)
    else:
        trace = build_trace(spec, base.model)
    unchunked = unchunked_budget(resolve_device(base), [r.prompt_len for r in trace])
    configs = [parse_config(c, base.max_num_batched_tokens, unchunked) for c in args.configs]
    slos = parse_slos(args.goodput)
    os.makedirs(args.output_dir, exist_ok=True)
    machine = machine_info(str(resolve_device(base)))  # load average at the start
    points = []
    for cfg in configs:
        if args.simulate:
            points += simulate_sweep_config(base, cfg, args.simulate, args.rates, trace, args.arrival, args.seed,
                                            add_engine_args, slos, args.lengths_known)
        elif args.target == "engine":
            points += sweep_engine(base, cfg, args.rates, trace, args.arrival, args.seed, add_engine_args,
                                   slos, args.progress, args.lengths_known)
        else:
            points += sweep_server(base, cfg, args.rates, trace, args.arrival, args.seed, slos, args.progress,
                                   args.max_concurrency, args.output_dir)
    table = sweep_table(points)
    memory = memory_table(points)
    if memory:
        how = "sampled every iteration" if args.target == "engine" else "the servers' /metrics, polled every 0.5 s"
        table += f"\n\nKV memory ({how}) and work done:\n\n" + memory
    png = os.path.join(args.output_dir, "figure10.png")
    title = args.title or (f"{spec.dataset} trace, {len(trace)} requests, target {args.target}"
                           + (f", simulated on {args.simulate}" if args.simulate else ""))
    plot_figure10(points, png, title)
    write_json(os.path.join(args.output_dir, "sweep.json"),
               {"command": command_line(), "machine": machine | {"load_avg_1m_end": load_average()},
                "target": args.target, "simulate": args.simulate, "arrival": args.arrival, "lengths_known": args.lengths_known,
                "trace": spec.describe() | trace_summary(trace), "configs": [c.__dict__ for c in configs],
                "rerun_argv": rerun_argv(args),
                "points": points})
    with open(os.path.join(args.output_dir, "sweep.md"), "w") as f:
        f.write(f"Command: `{command_line()}`\n\nMachine: {machine}\n\n{table}\n\n![Figure 10]({os.path.basename(png)})\n")
    print(table)
    print(f"figure: {png}")
    if args.kv_plot:
        from orcinus.bench.kv_usage import KVSample, plot_kv_utilisation

        series = {f"{p.config} @ {p.rate:g} req/s": [KVSample(**x) for x in p.kv_samples]
                  for p in points if p.kv_samples}
        plot_kv_utilisation(series, args.kv_plot, f"{title}, {args.arrival} arrivals, KV pool "
                                                  f"{base.kv_cache_memory or 'default'} bytes")
        print(f"KV plot: {args.kv_plot}")
    return 0 if all(p.failed == 0 for p in points) else 1
