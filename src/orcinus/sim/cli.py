"""Flags and handlers of the simulator's bench commands: `bench simulate` (Figure 10 / Table 1 and
a modern case), `bench calibrate`, and `--simulate HARDWARE` for `bench offline` / `bench sweep`."""
from __future__ import annotations

import argparse
import logging
import math
import os

logger = logging.getLogger(__name__)


def add_simulate_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--simulate", default=None, metavar="HARDWARE",
                   help="run the orcinus backends on the simulated executor instead of a model: 'this-machine' "
                        "(the stored `bench calibrate`), a hardware preset (a100-40gb, a100-80gb, h100, h200, "
                        "xeon-2core) or a JSON file; --model may then also be a shape preset (gpt3-175b, "
                        "llama-3-70b, ...) and --tensor/--pipeline-parallel-size partition it; times are predicted")


def add_sim_subparsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("simulate", help="the Orca paper's Figure 10 / Table 1 on simulated A100 clusters "
                                        "(orcinus's own scheduler on a virtual clock), and a modern case")
    p.add_argument("--models", default="gpt3-13b,gpt3-101b,gpt3-175b,gpt3-341b",
                   help="comma-separated GPT-3 sizes of Table 1 (default: all four)")
    p.add_argument("--hardware", default="a100-40gb", help="hardware preset or JSON file (default: the paper's)")
    p.add_argument("--num-requests", type=int, default=500, help="requests per point (default 500)")
    p.add_argument("--rates", default=None, help="request rates; default: fractions of the best system's capacity")
    p.add_argument("--modern", action=argparse.BooleanOptionalAction, default=True,
                   help="also Llama-3-70B on 8 x H100 (TP 8) with a ShareGPT-like trace")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", default="bench_results/simulate")
    p.set_defaults(func=_cmd_simulate)

    c = sub.add_parser("calibrate", help="measure this machine's per-iteration times on the default model and fit "
                                         "the simulator's efficiencies and overheads (stored as this-machine)")
    c.add_argument("--model", default=None, help="checkpoint folder or .gguf (default: the default model)")
    c.add_argument("--dtype", default="auto")
    c.add_argument("--quick", action="store_true", help="a smaller measurement (~1 min: tests, a first look; the "
                                                         "full one takes ~3-5 min on a quiet 2-core machine)")
    c.add_argument("--output", default=None, help="where to store it (default: the calibration cache)")
    c.add_argument("--from-samples", default=None, metavar="JSON",
                   help="refit from the iterations a previous calibration stored (no measurement)")
    c.set_defaults(func=_cmd_calibrate)


def _cmd_simulate(args: argparse.Namespace) -> int:
    from orcinus.bench.figure import sweep_table
    from orcinus.bench.report import command_line, machine_info, write_json
    from orcinus.sim.hardware import load_hardware
    from orcinus.sim.paper import (PAPER_SYSTEMS, TABLE1, comparison_table, modern_study, paper_targets, paper_trace,
                                   plot_studies, run_study)

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in models if m not in TABLE1]
    if bad:
        raise ValueError(f"unknown models {bad}; Table 1 has {list(TABLE1)}")
    rates = [float(r) for r in args.rates.replace(",", " ").split()] if args.rates else None
    trace = paper_trace(args.num_requests, args.seed)
    studies = [run_study(m, t, trace, PAPER_SYSTEMS, rates, args.seed)
               for m, t in paper_targets(load_hardware(args.hardware), models)]
    os.makedirs(args.output_dir, exist_ok=True)
    text = f"Command: `{command_line()}`\n\n## Figure 10 / Table 1, simulated\n\n{comparison_table(studies)}\n"
    png = os.path.join(args.output_dir, "figure10_simulated.png")
    plot_studies(studies, png)
    for st in studies:
        text += f"\n### {st['target']}\n\n{sweep_table(st['points'])}\n"
    if args.modern:
        modern = modern_study(args.num_requests, args.seed)
        plot_studies([modern], os.path.join(args.output_dir, "modern_simulated.png"))
        text += f"\n## {modern['target']}, ShareGPT-like trace\n\n{sweep_table(modern['points'])}\n"
        studies.append(modern)
    with open(os.path.join(args.output_dir, "simulate.md"), "w") as f:
        f.write(text)
    write_json(os.path.join(args.output_dir, "simulate.json"),
               {"command": command_line(), "machine": machine_info(), "studies": studies})
    print(text)
    print(f"figure: {png}")
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from orcinus.sim.calibrate import calibrate_this_machine

    if args.from_samples:
        from orcinus.sim.calibrate import refit

        cal = refit(args.from_samples, args.model, args.output)
    else:
        cal = calibrate_this_machine(args.model, args.dtype, quick=args.quick, output=args.output)
    print(cal.summary())
    return 0


def is_simulated(args: argparse.Namespace) -> bool:
    return getattr(args, "simulate", None) is not None


def rate_label(rate: float) -> str:
    return "inf" if math.isinf(rate) else f"{rate:g}"
