"""The virtual clock: a run is a pure function of its inputs; the pipeline timeline by hand."""
from __future__ import annotations

from orcinus.bench.workloads import TokenSampler, orca_trace
from orcinus.config import EngineConfig
from orcinus.sim.clock import PipelineTimeline, VirtualClock, VirtualFuture
from orcinus.sim.cost_model import Parallel
from orcinus.sim.engine import SimTarget
from orcinus.sim.hardware import load_hardware
from orcinus.sim.shapes import PRESETS
from orcinus.sim.sweep import simulate_point


def test_pipeline_timeline_by_hand() -> None:
    t = PipelineTimeline(2)
    # batch A: stage 0 takes 1 s, sends in 0.5 s, stage 1 takes 2 s
    assert t.run(0.0, [(1.0, 0.5), (2.0, 0.0)]) == 3.5
    # batch B launched at 0: stage 0 is busy until 1, stage 1 until 3.5
    assert t.run(0.0, [(1.0, 0.5), (2.0, 0.0)]) == 5.5


def test_waiting_on_a_future_moves_the_clock_forward_only() -> None:
    clock = VirtualClock(10.0)
    VirtualFuture(clock, 12.5, "x").result()
    assert clock.now == 12.5
    VirtualFuture(clock, 11.0, "y").result()
    assert clock.now == 12.5


def _point(seed: int):
    target = SimTarget(PRESETS["gpt3-13b"], load_hardware("a100-40gb"), Parallel(1, 1))
    trace = orca_trace(40, TokenSampler(50257), seed=seed)
    point, sim = simulate_point(EngineConfig(scheduler_policy="paged", max_num_seqs=8), target, "p", trace, 2.0,
                                seed=seed)
    return point, sim


def test_the_same_seed_gives_the_same_run_and_another_seed_another() -> None:
    a, sim_a = _point(1)
    b, sim_b = _point(1)
    c, _ = _point(2)
    fields = ("request_throughput", "median_normalized_latency_ms", "p90_normalized_latency_ms", "duration_s",
              "median_ttft_ms")
    assert [getattr(a, f) for f in fields] == [getattr(b, f) for f in fields]
    assert sim_a["iterations"] == sim_b["iterations"]
    assert a.duration_s != c.duration_s
