"""`orcinus bench validate-sim REPORT.json... --simulate HARDWARE`: how far the simulator's
predictions are from measured runs.

Each report is a measured `bench offline` JSON or a `bench sweep` sweep.json. It records the
arguments it was run with (`rerun_argv`; older reports: the command line). The same command is
run again in this process with `--simulate HARDWARE` added, through the same handler, so the
trace (dataset, lengths, seed, request count), the arrivals, the policies and every engine flag
are the measured run's. Each orcinus backend (offline) or configuration and rate (sweep) then
gives four comparisons: output tokens/s, requests/s, and the median and p90 normalized latency
(ms per output token, the Orca paper's metric); error = (predicted - measured) / measured.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import os
import shlex
import tempfile
from dataclasses import asdict, dataclass
from typing import Sequence

logger = logging.getLogger(__name__)

DEFAULT_TOLERANCE = 0.10
METRICS = ("output tok/s", "req/s", "median normalized latency (ms/token)", "p90 normalized latency (ms/token)")
# Flags of the measured command that take a value and must not carry over to the simulated run
# (its outputs go to a scratch folder; a simulated run has no plot or profile of its own).
_DROP_WITH_VALUE = ("--output-json", "--output-dir", "--kv-plot", "--simulate", "--title")
_DROP_ALONE = ("--profile", "--progress", "--no-progress", "--detokenize")


@dataclass
class Comparison:
    run: str  # the report, as named on the command line
    config: str  # backend (offline) or "config @ rate" (sweep)
    metric: str
    measured: float
    predicted: float

    @property
    def error(self) -> float:
        """(predicted - measured) / measured; NaN where nothing was measured."""
        if not (math.isfinite(self.measured) and math.isfinite(self.predicted)) or self.measured == 0:
            return math.nan
        return (self.predicted - self.measured) / self.measured

    def within(self, tolerance: float = DEFAULT_TOLERANCE) -> bool:
        return math.isfinite(self.error) and abs(self.error) <= tolerance + 1e-12


@dataclass
class Validation:
    hardware: str
    tolerance: float
    comparisons: list[Comparison]
    notes: list[str]

    @property
    def within_count(self) -> int:
        return sum(c.within(self.tolerance) for c in self.comparisons)

    def summary(self) -> str:
        return (f"{self.within_count} of {len(self.comparisons)} comparisons within "
                f"{100 * self.tolerance:g} % (simulated on {self.hardware})")

    def to_markdown(self) -> str:
        from orcinus.bench.report import fmt, markdown_table

        rows = [[c.run, c.config, c.metric, fmt(c.measured, 3), fmt(c.predicted, 3),
                 "n/a" if math.isnan(c.error) else f"{100 * c.error:+.1f}",
                 "yes" if c.within(self.tolerance) else "no"] for c in self.comparisons]
        text = markdown_table(["run", "backend / config", "metric", "measured", "predicted", "error %",
                               f"within {100 * self.tolerance:g} %"], rows)
        text += f"\n\n{self.summary()}"
        if self.notes:
            text += "\n\n" + "\n".join(f"note: {n}" for n in self.notes)
        return text

    def to_dict(self) -> dict:
        return {"hardware": self.hardware, "tolerance": self.tolerance, "within": self.within_count,
                "comparisons": [asdict(c) | {"error": c.error, "within": c.within(self.tolerance)}
                                for c in self.comparisons], "notes": self.notes}


# ------------------------------------------------------------------------------------ the rerun
def measured_argv(report: dict) -> list[str]:
    """["bench", "offline" | "sweep", ...] of the measured run."""
    argv = report.get("rerun_argv") or (report.get("settings") or {}).get("rerun_argv")
    if not argv:  # reports from before rerun_argv: the command line as typed
        words = shlex.split(report.get("command") or "")
        while words and words[0] != "bench":
            words.pop(0)
        argv = words
    if len(argv) < 2 or argv[0] != "bench" or argv[1] not in ("offline", "sweep"):
        raise ValueError("the report records no `orcinus bench offline` / `bench sweep` command to run again")
    return list(argv)


def simulated_argv(argv: Sequence[str], hardware: str, out: str) -> list[str]:
    """The measured command with --simulate HARDWARE, its outputs under `out`, no progress bars."""
    kept: list[str] = []
    skip = False
    for word in argv:
        if skip:
            skip = False
            continue
        name = word.split("=", 1)[0]
        if name in _DROP_WITH_VALUE:
            skip = "=" not in word
            if name == "--simulate":
                raise ValueError("this report is itself simulated: validate measured runs")
            continue
        if name in _DROP_ALONE:
            continue
        kept.append(word)
    kept += ["--simulate", hardware, "--no-progress"]
    if argv[1] == "offline":
        return kept + ["--no-floor", "--output-json", os.path.join(out, "simulated.json")]
    return kept + ["--output-dir", out]


def simulate_report(report: dict, hardware: str, parser: argparse.ArgumentParser | None) -> dict:
    """The simulated run's JSON report of the same command. `parser` is orcinus' root parser
    (`orcinus.cli` hands it over: this layer may not import the CLI above it)."""
    if parser is None:
        raise ValueError("validate-sim needs orcinus' command-line parser to run a report again: "
                         "call it through `orcinus bench validate-sim` (or pass orcinus.cli.build_parser())")
    with tempfile.TemporaryDirectory(prefix="orcinus-validate-sim-") as out:
        argv = simulated_argv(measured_argv(report), hardware, out)
        logger.info("validate-sim: orcinus %s", " ".join(shlex.quote(a) for a in argv))
        args = parser.parse_args(argv)
        args.argv = argv
        with contextlib.redirect_stdout(io.StringIO()):  # its own report: only the comparison is printed
            args.func(args)
        path = os.path.join(out, "simulated.json" if argv[1] == "offline" else "sweep.json")
        with open(path) as f:
            return json.load(f)


# ------------------------------------------------------------------------------------ comparing
def _num(value) -> float:
    if value is None:
        return math.nan
    return float(value)  # "inf" strings (write_json's) included


def _offline_metrics(result: dict, num_requests: int) -> list[float]:
    elapsed, tokens = _num(result.get("elapsed_s")), result.get("output_tokens", 0)
    ok = result.get("status") == "ok" and elapsed > 0
    return [tokens / elapsed if ok else math.nan, num_requests / elapsed if ok else math.nan,
            _num(result.get("median_normalized_latency_ms")), _num(result.get("p90_normalized_latency_ms"))]


def compare(run: str, measured: dict, predicted: dict) -> tuple[list[Comparison], list[str]]:
    out: list[Comparison] = []
    notes: list[str] = []
    if "points" in measured:  # bench sweep
        sim = {(p["config"], str(p["rate"])): p for p in predicted.get("points", [])}
        for p in measured["points"]:
            q = sim.get((p["config"], str(p["rate"])))
            label = f"{p['config']} @ {_num(p['rate']):g} req/s"
            if q is None:
                notes.append(f"{run}: {label} has no simulated point")
                continue
            keys = ("output_throughput", "request_throughput", "median_normalized_latency_ms",
                    "p90_normalized_latency_ms")
            out += [Comparison(run, label, m, _num(p[k]), _num(q[k])) for m, k in zip(METRICS, keys)]
        return out, notes
    n = int(measured["settings"]["trace"]["num_requests"])
    sim = {r["backend"]: r for r in predicted.get("results", [])}
    for r in measured.get("results", []):
        q = sim.get(r["backend"])
        if q is None or q.get("status") != "ok" or r.get("status") != "ok":
            why = (q or {}).get("status") if r.get("status") == "ok" else f"measured {r.get('status')}"
            notes.append(f"{run}: {r['backend']} not compared ({why})")
            continue
        out += [Comparison(run, r["backend"], m, a, b)
                for m, a, b in zip(METRICS, _offline_metrics(r, n), _offline_metrics(q, n))]
    return out, notes


def validate(paths: Sequence[str], hardware: str, tolerance: float = DEFAULT_TOLERANCE,
             parser: argparse.ArgumentParser | None = None) -> Validation:
    comparisons: list[Comparison] = []
    notes: list[str] = []
    for path in paths:
        with open(path) as f:
            measured = json.load(f)
        if (measured.get("settings") or {}).get("simulated") or measured.get("simulate"):
            raise ValueError(f"{path} is a simulated report: validate measured runs")
        run = path if os.path.basename(path) != "sweep.json" else os.path.dirname(path) or path
        if (measured.get("settings") or {}).get("mode", "batch") != "batch":
            notes.append(f"{run}: not compared (--mode {measured['settings']['mode']}: the simulator runs batches)")
            continue
        if measured.get("target") == "server":
            notes.append(f"{run}: measured through `orcinus serve` (HTTP, detokenisation); the simulation replays "
                         "into the engine, as --target engine does")
        machine = measured.get("machine") or {}
        if machine.get("load_avg_1m") is not None:  # a busy machine's numbers do not validate anything
            notes.append(f"{run}: measured at load average {machine['load_avg_1m']} -> "
                         f"{machine.get('load_avg_1m_end')} on {machine.get('cpu_count')} CPUs")
        got, why = compare(run, measured, simulate_report(measured, hardware, parser))
        comparisons += got
        notes += why
    return Validation(hardware, tolerance, comparisons, notes)


# ------------------------------------------------------------------------------------ the command
def add_validate_sim_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate-sim", help="run measured `bench offline` / `bench sweep` reports again on the "
                                            "simulated executor and tabulate the prediction errors")
    p.add_argument("reports", nargs="+", metavar="REPORT.json",
                   help="measured `bench offline --output-json` files or `bench sweep` sweep.json files")
    p.add_argument("--simulate", required=True, metavar="HARDWARE",
                   help="this-machine (the stored `bench calibrate`), a preset or a hardware JSON file")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE, help="relative error counted as within "
                                                                               "(default %(default)s)")
    p.add_argument("--output-json", default=None, help="write the comparisons here")
    p.add_argument("--markdown", default=None, help="write the table here")
    p.set_defaults(func=cmd_validate_sim)


def cmd_validate_sim(args: argparse.Namespace) -> int:
    from orcinus.bench.report import command_line, machine_info, write_json

    v = validate(args.reports, args.simulate, args.tolerance, args.root_parser)
    text = v.to_markdown()
    print(text)
    if args.output_json:
        write_json(args.output_json, {"command": command_line(), "machine": machine_info()} | v.to_dict())
        print(f"comparisons written to {args.output_json}")
    if args.markdown:
        os.makedirs(os.path.dirname(os.path.abspath(args.markdown)), exist_ok=True)
        with open(args.markdown, "w") as f:
            f.write(f"Command: `{command_line()}`\n\n{text}\n")
        print(f"table written to {args.markdown}")
    return 0
