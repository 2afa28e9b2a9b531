"""`orcinus bench sweep`: configurations × request rates on one trace, for Figure 10.

Every configuration sees the same trace with the same seeded arrivals at each rate. The target
is either `server` (each configuration's `orcinus serve` started as a child process and loaded
over HTTP by the load generator: what a client sees) or `engine` (the trace replayed in real time
into an in-process engine: what the scheduling policy alone does).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from orcinus.bench.arrivals import ArrivalMode, with_arrivals
from orcinus.bench.figure import SweepPoint
from orcinus.bench.load_generator import LoadRun
from orcinus.bench.workloads import BenchRequest
from orcinus.config import EngineConfig
from orcinus.engine.arg_utils import engine_config_from_args

logger = logging.getLogger(__name__)

# The paper's comparison: Orca at several max batch sizes against request-level batching.
DEFAULT_CONFIGS = ("orca:8", "orca:16", "orca:32", "static:1", "static:8")


@dataclass
class SweepConfig:
    label: str
    engine_args: list[str]  # engine flags on top of the sweep's common ones


# How often the server target polls each server's /metrics for its KV use.
METRICS_INTERVAL_S = 0.5
def parse_config(spec: str, chunked_budget: int | None = None, unchunked: int | None = None) -> SweepConfig:
    """`POLICY:MAX_NUM_SEQS` (e.g. `orca:16`), `LABEL=ENGINE FLAGS` (e.g. `big=--max-num-seqs 64`), or
    one of `bench offline`'s orcinus backends (`orca`, `paged`, `paged-chunked`, ...): that policy
    with a budget every prompt fits in whole (`unchunked`, from orcinus/bench/budgets.py; the CPU's
    2048 when not given), or with `chunked_budget` (default 512) for the `-chunked` ones."""
    from orcinus.bench.budgets import UNCHUNKED_BUDGET_CPU
    from orcinus.bench.offline import CHUNKED_BUDGET, ORCINUS_BACKENDS

    if spec in ORCINUS_BACKENDS:
        budget = (chunked_budget or CHUNKED_BUDGET) if spec.endswith("-chunked") else (unchunked or UNCHUNKED_BUDGET_CPU)
        return SweepConfig(spec, ["--scheduler-policy", spec.removesuffix("-chunked"),
                                  "--max-num-batched-tokens", str(budget)])
    if "=" in spec:
        label, flags = spec.split("=", 1)
        return SweepConfig(label.strip(), flags.split())
    policy, sep, seqs = spec.partition(":")
    if not sep or not seqs.isdigit():
        raise ValueError(f"config {spec!r}: expected POLICY:MAX_NUM_SEQS, LABEL=FLAGS or one of "
                         f"orca, static, paged, paged-chunked, orca-chunked")
    return SweepConfig(f"{policy} max_num_seqs={seqs}", ["--scheduler-policy", policy, "--max-num-seqs", seqs])


def engine_flags(config: EngineConfig) -> list[str]:
    """The flags that reproduce `config`'s non-default settings (for a server's command line)."""
    flags: list[str] = []
    defaults = EngineConfig()
    for f in dataclasses.fields(EngineConfig):
        value = getattr(config, f.name)
        if value == getattr(defaults, f.name):
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + f.name.replace("_", "-"))
        elif value is not None:
            flags += [flag, str(value)]
    return flags


def apply_flags(base: EngineConfig, flags: Sequence[str], add_engine_args: Callable) -> EngineConfig:
    """`base` with `flags` parsed on top, by the same parser as the CLI's engine flags."""
    parser = argparse.ArgumentParser(add_help=False)
    add_engine_args(parser)
    parser.set_defaults(**dataclasses.asdict(base))
    ns = parser.parse_args(list(flags))
    return engine_config_from_args(ns)


def point_of(label: str, rate: float, run: LoadRun) -> SweepPoint:
    m = run.metrics
    return SweepPoint(label, rate, m.request_throughput, m.output_throughput, m.normalized_latency_ms.median,
                      m.normalized_latency_ms.p90, m.ttft_ms.median, m.e2el_ms.median, m.completed, m.failed,
                      m.duration_s)


def _warm_up(engine, trace: Sequence[BenchRequest]) -> None:
    """One tiny request first, so the first measured rate does not pay first-call costs."""
    from orcinus.bench.engine_driver import replay_on_engine

    replay_on_engine(engine, [BenchRequest(trace[0].prompt_token_ids[:8], 2)], progress=False)


def sweep_engine(base: EngineConfig, cfg: SweepConfig, rates: Sequence[float], trace: Sequence[BenchRequest],
                 mode: ArrivalMode, seed: int, add_engine_args: Callable, slos_ms: dict[str, float],
                 progress: bool, lengths_known: bool = True) -> list[SweepPoint]:
    """Each rate replayed on one in-process engine, with its KV use sampled every iteration and the
    process CPU time beside the wall time. Every rate starts with an empty prefix cache: each rate
    replays the same prompts, which would otherwise be found whole in the cache of the one before."""
    from orcinus.bench.engine_driver import replay_on_engine
    from orcinus.bench.kv_usage import KVRecorder
    from orcinus.engine.llm_engine import LLMEngine

    config = dataclasses.replace(apply_flags(base, cfg.engine_args, add_engine_args), skip_tokenizer_init=True)
    engine = LLMEngine(config)
    try:
        _warm_up(engine, trace)
        points = []
        for rate in rates:
            engine.kv_cache.reset_prefix_cache()  # idle here: every block is free
            recorder = KVRecorder(engine)
            recorder.restart()
            c0 = time.process_time()
            try:
                run = replay_on_engine(engine, with_arrivals(trace, rate, mode, seed), slos_ms, progress,
                                       desc=f"{cfg.label} @ {rate:g} req/s", lengths_known=lengths_known)
            finally:
                recorder.detach()
            _log_run(cfg.label, rate, run)
            points.append(dataclasses.replace(point_of(cfg.label, rate, run), cpu_s=time.process_time() - c0,
                                              kv=recorder.summary().as_dict(),
                                              kv_samples=[dataclasses.asdict(x) for x in recorder.samples]))
        return points
    finally:
        engine.shutdown()


def sweep_server(base: EngineConfig, cfg: SweepConfig, rates: Sequence[float], trace: Sequence[BenchRequest],
                 mode: ArrivalMode, seed: int, slos_ms: dict[str, float], progress: bool,
                 max_concurrency: int | None, log_dir: str | None) -> list[SweepPoint]:
    from orcinus.bench.client import EndpointConfig
    from orcinus.bench.load_generator import run_load
    from orcinus.bench.server_process import ServerProcess

    safe = "".join(c if c.isalnum() else "_" for c in cfg.label)
    points = []
    # A fresh server per rate: each rate replays the same prompts, which a server with prefix caching
    # (paged's default) would otherwise find whole in the cache the previous rate left.
    for rate in rates:
        log_path = os.path.join(log_dir, f"server_{safe}_{rate:g}.log") if log_dir else None
        with ServerProcess(engine_args=[*engine_flags(base), *cfg.engine_args], log_path=log_path) as server:
            ep = EndpointConfig(server.base_url, model="")
            run_load([BenchRequest(trace[0].prompt_token_ids[:8], 2)], ep, progress=False)  # warm-up
            run = run_load(with_arrivals(trace, rate, mode, seed), ep, max_concurrency, slos_ms, progress,
                           desc=f"{cfg.label} @ {rate:g} req/s", metrics_interval_s=METRICS_INTERVAL_S)
        _log_run(cfg.label, rate, run)
        points.append(dataclasses.replace(point_of(cfg.label, rate, run), kv=run.server_kv,
                                          kv_samples=run.server_kv_samples))
    return points


def _log_run(label: str, rate: float, run: LoadRun) -> None:
    m = run.metrics
    logger.info("sweep %s @ %s req/s: %.3f req/s, median normalized latency %.1f ms/token, %d/%d ok%s",
                label, "inf" if math.isinf(rate) else f"{rate:g}", m.request_throughput,
                m.normalized_latency_ms.median, m.completed, m.completed + m.failed,
                f" (errors: {run.errors[:2]})" if run.errors else "")
