"""Simulated sweep points: one configuration x one rate on the virtual clock, reported as the
real sweep's `SweepPoint`s (so `bench/figure.py` tables and plots them unchanged)."""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Sequence

from orcinus.bench.arrivals import ArrivalMode, with_arrivals
from orcinus.bench.figure import SweepPoint
from orcinus.bench.workloads import BenchRequest
from orcinus.config import EngineConfig
from orcinus.sim.clock import VirtualClock
from orcinus.sim.engine import SimTarget, build_sim_engine
from orcinus.sim.replay import replay_simulated, trace_lengths


def simulate_point(config: EngineConfig, target: SimTarget, label: str, trace: Sequence[BenchRequest], rate: float,
                   mode: ArrivalMode = "poisson", seed: int = 0, slos_ms: dict[str, float] | None = None,
                   lengths_known: bool = True, pad_static: bool = False) -> tuple[SweepPoint, dict]:
    """(the point, what the simulated engine did); `cpu_s` is the simulator's own process time,
    `duration_s` virtual seconds."""
    from orcinus.bench.sweep import point_of

    timed = with_arrivals(trace, rate, mode, seed)
    clock = VirtualClock()
    engine, executor = build_sim_engine(config, target, None if lengths_known else trace_lengths(timed), clock)
    executor.pad_static = pad_static
    c0 = time.process_time()
    try:
        run = replay_simulated(engine, clock, timed, slos_ms, lengths_known)
    finally:
        engine.shutdown()
    sim = {"iterations": executor.stats.iterations, "preemptions": getattr(engine.scheduler, "num_preemptions", 0),
          "mean_rows": executor.stats.rows / max(executor.stats.iterations, 1),
          "busy_fraction": executor.stats.busy_s / run.duration_s if run.duration_s > 0 else math.nan}
    sim["mean_batch_tokens"] = executor.stats.tokens / max(executor.stats.iterations, 1)
    return dataclasses.replace(point_of(label, rate, run), cpu_s=time.process_time() - c0), sim
