"""`orcinus bench calibrate`: fit the cost model's efficiencies and the engine's per-iteration
overhead to this machine, from orcinus's own measured iterations.

Measurement: the real engine (default model) runs a few offline workloads chosen to span the
cost model's regimes (single requests, decode batches of 8-48 rows, whole prompts, prompt chunks);
each iteration's forward time is taken on the forward thread around the executor's call, and each
step's own time (the step minus its wait for the iteration) is the control plane. The phase
profile of `bench/profile.py` is recorded beside it.

Fit: forward time = gemm x 1/eff_gemm (compute-bound GEMMs) + (memory-bound GEMM bytes +
element-wise bytes) x 1/eff_memory + attention x 1/eff_attention (each at the machine's measured
peak rates); which GEMMs are compute-bound depends on the efficiencies, so classification and a
non-negative least-squares fit (relative error) alternate until they agree. Overhead = a + b x rows,
least squares. The result is stored as the `this-machine` hardware.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from orcinus.sim.cost_model import BatchShape, CostModel, Parallel
from orcinus.sim.hardware import HARDWARE_DIR, Hardware, HardwareError, Overhead, calibration_path
from orcinus.sim.shapes import ModelShape

logger = logging.getLogger(__name__)
FIT_CLASSES = ("gemm", "memory", "attention")


# ------------------------------------------------------------------------------------ fitting
def _features(cost: CostModel, b: BatchShape, eff: dict[str, float]) -> list[float]:
    w = cost.stage_work(b, 0)
    peak, bw = cost.peak, cost.hw.memory_bandwidth
    gc, gm = w.gemm_flops / peak, w.gemm_bytes / bw
    compute_bound = gc / eff["gemm"] > gm / eff["memory"]
    return [gc if compute_bound else 0.0, (0.0 if compute_bound else gm) + w.elem_bytes / bw,
            max(w.attn_flops / peak, w.attn_bytes / bw)]


def _nnls(a: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with x >= 0 by trying every subset of columns (few columns)."""
    k = a.shape[1]
    best, best_err = np.zeros(k), float(np.sum(y ** 2))
    for r in range(1, k + 1):
        for cols in itertools.combinations(range(k), r):
            sub = a[:, cols]
            if not np.any(sub):
                continue
            x, *_ = np.linalg.lstsq(sub, y, rcond=None)
            if np.any(x < 0):
                continue
            err = float(np.sum((sub @ x - y) ** 2))
            if err < best_err:
                best_err, best = err, np.zeros(k)
                best[list(cols)] = x
    return best


def _robust_fit(a: np.ndarray, y: np.ndarray, rounds: int = 8) -> np.ndarray:
    """Non-negative fit of a @ x ~ y in relative error, reweighted towards least absolute relative
    error: on a shared machine other people's load slows some iterations several times over, and
    a squared loss would follow those."""
    w = 1.0 / y  # relative error: short and long iterations count alike
    x = _nnls(a * w[:, None], y * w)
    for _ in range(rounds):
        r = np.abs(a @ x - y) / y
        wr = w / np.sqrt(np.maximum(r, 1e-3))  # IRLS for the L1 loss
        x = _nnls(a * wr[:, None], y * wr)
    return x


def fit_efficiencies(cost: CostModel, samples: Sequence[tuple[BatchShape, float]], rounds: int = 12,
                     with_fixed: bool = False) -> dict[str, float] | tuple[dict[str, float], Overhead]:
    """Efficiencies (gemm, memory, attention) that best predict the forward seconds of `samples`.
    with_fixed: also fit a fixed and a per-row time per iteration (on CPU the forward's own Python
    and dispatch cost per layer and per request), returned as an `Overhead`."""
    eff = {c: 0.5 for c in FIT_CLASSES}
    y = np.array([t for _, t in samples])
    fixed = Overhead()
    for _ in range(rounds):
        a = np.array([_features(cost, b, eff) + ([1.0, float(b.rows)] if with_fixed else []) for b, _ in samples])
        x = _robust_fit(a, y)
        new = {c: min(1.0 / v, 10.0) if v > 1e-12 else 10.0 for c, v in zip(FIT_CLASSES, x)}
        if with_fixed:
            fixed = Overhead(float(x[3]), float(x[4]), 0.0)
        done = all(abs(new[c] - eff[c]) < 1e-6 * eff[c] for c in FIT_CLASSES)
        eff = new
        if done:
            break
    return (eff, fixed) if with_fixed else eff


def fit_overhead(samples: Sequence[tuple[int, float]]) -> Overhead:
    """seconds = a + b x rows (both >= 0)."""
    a = np.array([[1.0, r] for r, _ in samples])
    y = np.array([s for _, s in samples])
    x = _robust_fit(a, np.maximum(y, 1e-6))
    return Overhead(float(x[0]), float(x[1]), 0.0)


# ------------------------------------------------------------------------------------ measuring
@dataclass
class Workload:
    label: str
    max_num_seqs: int
    num_requests: int
    prompt_len: tuple[int, int]
    output_len: tuple[int, int]
    budget: int = 1 << 30


WORKLOADS = (
    Workload("single", 1, 3, (16, 200), (24, 24)),
    Workload("decode-8", 8, 16, (32, 256), (8, 48)),
    Workload("decode-48", 48, 64, (16, 128), (16, 48)),
    Workload("chunked", 16, 12, (200, 400), (8, 16), budget=128),
)
QUICK = (Workload("single", 1, 2, (16, 64), (8, 8)), Workload("decode-8", 8, 8, (16, 96), (4, 16)))


@dataclass
class Measured:
    forward: list[tuple[BatchShape, float]] = field(default_factory=list)
    overhead: list[tuple[int, float]] = field(default_factory=list)  # (rows, engine seconds per step)
    profile_markdown: str = ""


def measure(model: str | None, dtype: str, workloads: Sequence[Workload], seed: int = 0,
            basis: str = "wall") -> Measured:
    """basis "wall" (default): wall-clock seconds. "cpu": CPU seconds, which light load from
    others does not stretch: the process's CPU time over a forward divided by torch's threads
    (every thread of the OpenMP team works or spins through an iteration), and the engine thread's
    own CPU time over a step (it sleeps while it waits). On an oversubscribed machine OpenMP's
    spinning while a descheduled peer is awaited inflates it (measured: 0.5-1 s per decode of the
    default model at load average 19, against ~0.05-0.25 s of wall time)."""
    import random

    import torch

    from orcinus.bench.profile import profile_phases
    from orcinus.config import EngineConfig
    from orcinus.engine.llm_engine import LLMEngine
    from orcinus.sampling_params import SamplingParams
    from orcinus.sim.executor import RowTracker

    if basis not in ("cpu", "wall"):
        raise ValueError(f"basis must be cpu or wall, not {basis!r}")
    clock = time.process_time if basis == "cpu" else time.perf_counter
    engine_clock = time.thread_time if basis == "cpu" else time.perf_counter
    out = Measured()
    rng = random.Random(seed)
    for wl in workloads:
        engine = LLMEngine(EngineConfig(model=model, dtype=dtype, skip_tokenizer_init=True, scheduler_policy="orca",
                                        max_num_seqs=wl.max_num_seqs, max_num_batched_tokens=wl.budget,
                                        enable_prefix_caching=False))
        try:
            executor, tracker = engine.executor, RowTracker()
            # The call that runs an iteration on the forward thread: the in-process executor's
            # `_execute` where it has one, else its (synchronous) `execute_async`.
            attr = "_execute" if hasattr(executor, "_execute") else "execute_async"
            inner = getattr(executor, attr)
            timed: list[tuple[BatchShape, float]] = []

            def execute(msg, inner=inner, tracker=tracker, timed=timed):  # runs on the forward thread
                rows, _ = tracker.rows(msg)
                t0 = clock()
                out = inner(msg)
                if hasattr(out, "result"):
                    out.result()
                if rows:
                    timed.append((BatchShape.of(rows), (clock() - t0) / per_thread))
                return out

            per_thread = torch.get_num_threads() if basis == "cpu" else 1
            setattr(executor, attr, execute)
            waits: list[float] = []
            wait_inner = engine._wait_for

            def wait_for(flight, wait_inner=wait_inner, waits=waits):
                t0 = engine_clock()
                try:
                    return wait_inner(flight)
                finally:
                    waits.append(engine_clock() - t0)

            engine._wait_for = wait_for
            vocab = engine.model_config.vocab_size
            warm = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
            engine.add_request("warm", {"prompt_token_ids": [1 + i % (vocab - 1) for i in range(16)]}, warm)
            while engine.has_unfinished_requests():
                engine.step()
            timed.clear()
            waits.clear()
            for i in range(wl.num_requests):
                p = rng.randint(*wl.prompt_len)
                params = SamplingParams(temperature=0.0, max_tokens=rng.randint(*wl.output_len), ignore_eos=True)
                engine.add_request(f"{wl.label}-{i}", {"prompt_token_ids": [rng.randrange(1, vocab) for _ in range(p)]},
                                   params)
            steps: list[tuple[int, float]] = []
            with profile_phases(engine) as prof:
                while engine.has_unfinished_requests():
                    flight_rows = engine._in_flight[0].message.num_requests if engine._in_flight else None
                    t0 = engine_clock()
                    engine.step()
                    steps.append((flight_rows, engine_clock() - t0))
            out.forward += timed
            # step k waits for the iteration launched at the end of step k-1 (the first launches its own)
            for (rows, step_s), wait_s, shape in zip(steps, waits, [b for b, _ in timed]):
                out.overhead.append((rows if rows is not None else shape.rows, max(step_s - wait_s, 0.0)))
            out.profile_markdown += f"\n\n{wl.label}:\n\n{prof.to_markdown()}"
            logger.info("calibrate: %s: %d iterations", wl.label, len(timed))
        finally:
            engine.shutdown()
    return out


@dataclass
class Calibration:
    hardware: Hardware
    model: str
    dtype: str
    iterations: int
    median_abs_error: float  # of the forward fit, relative
    path: str
    profile_markdown: str = ""

    def summary(self) -> str:
        hw = self.hardware
        eff = ", ".join(f"{k} {v:.3f}" for k, v in hw.efficiency.items())
        return (f"calibrated {self.model} ({self.dtype}) on {self.iterations} iterations: efficiencies {eff}; "
                f"overhead {hw.overhead.iteration_s * 1e3:.2f} ms + {hw.overhead.per_row_s * 1e6:.1f} us/row; "
                f"peak {hw.peak_flops / 1e9:.1f} GFLOP/s, {hw.memory_bandwidth / 1e9:.1f} GB/s; median relative "
                f"error of the forward fit {100 * self.median_abs_error:.1f} %\nstored in {self.path}")


def calibrate_this_machine(model: str | None = None, dtype: str = "auto", quick: bool = False,
                           output: str | None = None, basis: str = "wall") -> Calibration:
    import torch

    from orcinus.bench.floor import measure_device
    from orcinus.bench.report import load_average
    from orcinus.bench.trace_builder import read_model_config
    from orcinus.config import EngineConfig

    from orcinus.executor.platform import resolve_for_config

    resolved = str(resolve_for_config(EngineConfig(model=model, dtype=dtype, device="cpu"))[1]).removeprefix("torch.")
    with open(os.path.join(HARDWARE_DIR, "xeon-2core.json")) as f:
        base = Hardware.from_dict(json.load(f))
    if basis == "wall":  # peak rates measured now, as the iterations are
        rates = measure_device(torch.device("cpu"), getattr(torch, resolved), repeats=3 if quick else 5)
        peak, bandwidth, label = rates.matmul_flops, rates.copy_bandwidth, rates.label
    else:  # on a busy machine a measurement now is stretched by others' load: the preset's quiet one
        peak, bandwidth, label = base.flops_for(resolved), base.memory_bandwidth, "xeon-2core preset"
    hw = dataclasses.replace(base, name="this-machine", peak_flops=peak, peak_flops_by_dtype={resolved: peak},
                             memory_bandwidth=bandwidth)
    shape = ModelShape.from_model_config(read_model_config(model), name=model or "default")
    load_before = load_average()
    m = measure(model, dtype, QUICK if quick else WORKLOADS, basis=basis)
    source = (f"orcinus bench calibrate on {time.strftime('%Y-%m-%d %H:%M')} UTC: model {shape.name}, {resolved}, "
              f"{len(m.forward)} iterations, {basis} time, load average {load_before} -> {load_average()}",
              f"peak rates ({label}): {peak / 1e9:.1f} GFLOP/s matmul, {bandwidth / 1e9:.1f} GB/s copy")
    cal = fit_and_store(shape, hw, resolved, m, output or calibration_path(), source)
    return cal


def fit_and_store(shape: ModelShape, hw: Hardware, resolved: str, m: Measured, path: str,
                  source: tuple[str, ...]) -> Calibration:
    cost = CostModel(shape, hw, Parallel(), resolved)
    eff, forward_fixed = fit_efficiencies(cost, m.forward, with_fixed=True)
    engine_own = fit_overhead(m.overhead)
    # The simulated executor adds the overhead to every iteration, so the forward's fixed cost and
    # the engine's own time add up.
    overhead = Overhead(engine_own.iteration_s + forward_fixed.iteration_s,
                        engine_own.per_row_s + forward_fixed.per_row_s, 0.0)
    hw = hw.with_efficiency(eff, overhead)
    fitted = CostModel(shape, hw, Parallel(), resolved)
    errs = [abs(fitted.iteration_seconds(b) + forward_fixed.seconds(b.rows, b.tokens) - t) / t for b, t in m.forward]
    hw = dataclasses.replace(hw, sources=(*source, "efficiencies and overhead fitted (orcinus/sim/calibrate.py); "
                                                   "they hold for models of this size"))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        # the measured iterations ride along, to refit or inspect (Hardware.from_dict ignores them)
        json.dump(hw.to_dict() | {"calibration_samples": {
            "forward": [[b.tokens, b.rows, b.sampled, b.keys_seen, b.kv_tokens, t] for b, t in m.forward],
            "engine_own": [[r, t] for r, t in m.overhead]}}, f, indent=2)
    return Calibration(hw, shape.name, resolved, len(m.forward), float(np.median(errs)), path, m.profile_markdown)


def refit(samples_path: str, model: str | None = None, output: str | None = None) -> Calibration:
    """Fit again from the iterations a calibration stored (a changed fit, no new measurement)."""
    from orcinus.bench.trace_builder import read_model_config

    with open(samples_path) as f:
        stored = json.load(f)
    if "calibration_samples" not in stored:
        raise HardwareError(f"{samples_path} holds no calibration samples")
    hw = Hardware.from_dict(stored)
    resolved = next(iter(hw.peak_flops_by_dtype), "float32")
    shape = ModelShape.from_model_config(read_model_config(model), name=model or "default")
    samples = stored["calibration_samples"]
    m = Measured([(BatchShape(int(t), int(r), int(s), k, int(kv)), sec) for t, r, s, k, kv, sec in samples["forward"]],
                 [(int(r), sec) for r, sec in samples["engine_own"]])
    source = tuple(x for x in hw.sources if not x.startswith("efficiencies and overhead fitted"))
    return fit_and_store(shape, hw, resolved, m, output or calibration_path(), (*source, f"refit from {samples_path}"))
