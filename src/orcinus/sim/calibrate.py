"""`orcinus bench calibrate`: fit the cost model's efficiencies and the engine's per-iteration
overhead to this machine, from orcinus's own measured iterations.

Measurement: the real engine (default model, default thread policy) runs offline workloads chosen
to span what runs do (single requests, decode batches of 8-64 rows, whole prompts alone and many
at once, prompts joining running decodes, prompt chunks); every iteration is timed through the
engine's observer hooks (`IterationTimer`): its shape from the batch the engine reports launching,
its time from the forward thread's phases reported with its result; the step's time less that
forward is the control plane. Both the peak-rate measurement and the workloads run on threads that
end with them, so no OpenMP team is left on the main thread beside the forward thread's
(bench/own_thread.py): the engine is measured as `bench offline` runs it. The phase profile of
`bench/profile.py` is recorded beside it, and the loaded model's weight bytes
(`sim/weight_bytes.py`: quantized blocks as held).

Fit: forward time = fixed + per row x rows + compute-bound GEMM flops x 1/eff_gemm + (memory-bound
GEMM bytes + element-wise bytes) x 1/eff_memory + attention x 1/eff_attention + for quantized
weights the integer kernel's flops x 1/eff_qdot and the dequantised bytes x 1/eff_dequant (each at
the machine's measured peak rates); which GEMMs are compute-bound depends on the efficiencies, so
classification and a non-negative least-squares fit (relative error) alternate until they agree.
Overhead = a + b x rows, least squares. The result is stored as the `this-machine` hardware.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from orcinus.engine.iteration_stats import IterationStats
from orcinus.sim.cost_model import BatchShape, CostModel, Parallel
from orcinus.sim.hardware import HARDWARE_DIR, Hardware, HardwareError, Overhead, calibration_path
from orcinus.sim.shapes import ModelShape
from orcinus.sim.weight_bytes import WeightInfo, measure_weight_info, model_key, store_weight_info

logger = logging.getLogger(__name__)
FIT_CLASSES = ("gemm", "memory", "attention", "qdot", "dequant")


def _features(cost: CostModel, b: BatchShape, eff: dict[str, float]) -> list[float]:
    """Seconds of each class at efficiency 1, in FIT_CLASSES order: the GEMMs on whichever side of
    the roofline the current efficiencies put them, element-wise bytes with the memory-bound
    side, attention, and the quantized weights' integer kernel and dequantisation."""
    w = cost.stage_work(b, 0)
    peak, bw = cost.peak, cost.hw.memory_bandwidth
    gc, gm = w.gemm_flops / peak, w.gemm_bytes / bw
    compute_bound = gc / eff["gemm"] > gm / eff["memory"]
    return [gc if compute_bound else 0.0, (0.0 if compute_bound else gm) + w.elem_bytes / bw,
            max(w.attn_flops / peak, w.attn_bytes / bw), w.qdot_flops / peak, w.dequant_bytes / bw]


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
        # a class no sample exercises (no quantized weights, say) keeps the hardware's value
        seen = np.any(a[:, :len(FIT_CLASSES)] > 0, axis=0)
        new = {c: (min(1.0 / v, 10.0) if v > 1e-12 else 10.0) if used else cost.hw.eff(c)
               for c, v, used in zip(FIT_CLASSES, x, seen)}
        if with_fixed:
            k = len(FIT_CLASSES)
            fixed = Overhead(float(x[k]), float(x[k + 1]), 0.0)
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


# Chosen to span what runs will do: one row, decode batches of 8, 24 and 64 rows (past the
# quantized path's crossover where it has one, layers/quantized_linear.dequant_min_rows), whole prompts alone and
# many at once, and mixed iterations (prompts joining running decodes; prompt chunks beside them).
# ~3 min of measurement on the 2-core Xeon (2 min before decode-16 was added, at load average 2);
# --quick ~20 s.
WORKLOADS = (
    Workload("single", 1, 3, (16, 200), (24, 24)),
    Workload("decode-8", 8, 16, (32, 256), (8, 48)),
    Workload("decode-16", 16, 32, (16, 200), (16, 64)),
    Workload("mixed-24", 24, 48, (16, 160), (4, 48)),
    Workload("decode-64", 64, 128, (16, 96), (16, 64)),
    Workload("chunked", 16, 24, (200, 400), (8, 24), budget=128),
)
QUICK = (Workload("single", 1, 2, (16, 64), (8, 8)), Workload("decode-8", 8, 8, (16, 96), (4, 16)),
         Workload("decode-64", 64, 64, (8, 32), (6, 10)))


@dataclass
class Measured:
    forward: list[tuple[BatchShape, float]] = field(default_factory=list)
    overhead: list[tuple[int, float]] = field(default_factory=list)  # (rows, engine seconds per step)
    profile_markdown: str = ""
    weights: WeightInfo | None = None  # of the model measured, as loaded
    requests: list[tuple[int, int]] = field(default_factory=list)  # (prompt, output) lengths run


class IterationTimer:
    """An engine observer (`LLMEngine.add_observer(fn, phases=True)`, engine/iteration_stats.py):
    each iteration's shape from the batches the engine reports launching, its time from the
    forward thread's phases (input preparation + forward + sampling) that the worker reports with
    the iteration's result. Batches are collected in the order they are launched, so the k-th
    timed iteration is the k-th launched batch. The engine's own share of a step, beyond the
    forward it waited for, is the step's time less that forward's (the control plane that the
    forward does not overlap)."""

    def __init__(self) -> None:
        self.pending: deque[BatchShape] = deque()
        self.forward: list[tuple[BatchShape, float]] = []
        self.overhead: list[tuple[int, float]] = []

    def __call__(self, it: IterationStats) -> None:
        for b in it.launched:
            self.pending.append(BatchShape(b.num_tokens, b.num_requests, b.num_sampled, b.keys_seen, b.kv_tokens))
        if it.phases is None:
            return
        for worker in it.phases.worker:
            shape = self.pending.popleft()
            seconds = sum(worker.seconds.get(p, 0.0) for p in ("input preparation", "forward", "sampling"))
            self.forward.append((shape, seconds))
            if len(it.phases.worker) == 1:
                self.overhead.append((shape.rows, max(it.phases.step_s - seconds, 0.0)))

    def clear(self) -> None:
        self.forward.clear()
        self.overhead.clear()


def measure(model: str | None, dtype: str, workloads: Sequence[Workload], seed: int = 0) -> Measured:
    """Runs each workload through the real engine (orca policy, no prefix caching) and times its
    iterations through the engine's observer hooks; wall-clock seconds."""
    import random

    from orcinus.bench.profile import profile_phases
    from orcinus.config import EngineConfig
    from orcinus.engine.llm_engine import LLMEngine
    from orcinus.sampling_params import SamplingParams

    out = Measured()
    rng = random.Random(seed)
    for wl in workloads:
        engine = LLMEngine(EngineConfig(model=model, dtype=dtype, skip_tokenizer_init=True, scheduler_policy="orca",
                                        max_num_seqs=wl.max_num_seqs, max_num_batched_tokens=wl.budget,
                                        enable_prefix_caching=False))
        try:
            if out.weights is None:
                out.weights = loaded_weight_info(engine)
            vocab = engine.model_config.vocab_size
            # warm-up: first calls at the workload's widest shapes (allocations, scratch buffers)
            warm = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
            for i in range(min(wl.max_num_seqs, wl.num_requests)):
                engine.add_request(f"warm-{i}", {"prompt_token_ids": [1 + (i + j) % (vocab - 1)
                                                                      for j in range(wl.prompt_len[0])]}, warm)
            while engine.has_unfinished_requests():
                engine.step()
            for i in range(wl.num_requests):
                p = rng.randint(*wl.prompt_len)
                params = SamplingParams(temperature=0.0, max_tokens=rng.randint(*wl.output_len), ignore_eos=True)
                out.requests.append((p, params.max_tokens))
                engine.add_request(f"{wl.label}-{i}", {"prompt_token_ids": [rng.randrange(1, vocab) for _ in range(p)]},
                                   params)
            timer = IterationTimer()
            engine.add_observer(timer, phases=True)
            try:
                with profile_phases(engine) as prof:
                    while engine.has_unfinished_requests():
                        engine.step()
            finally:
                engine.remove_observer(timer)
            out.forward += timer.forward
            out.overhead += timer.overhead
            out.profile_markdown += f"\n\n{wl.label}:\n\n{prof.to_markdown()}"
            logger.info("calibrate: %s: %d iterations, up to %d rows", wl.label, len(timer.forward),
                        max((b.rows for b, _ in timer.forward), default=0))
        finally:
            engine.shutdown()
    return out


def loaded_weight_info(engine) -> WeightInfo | None:
    """The weights' bytes as the engine's in-process worker holds them (None with worker processes)."""
    worker = getattr(engine.executor, "driver_worker", None)
    model = getattr(getattr(worker, "runner", None), "model", None)
    return measure_weight_info(model, engine.dtype) if model is not None else None


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
                           output: str | None = None) -> Calibration:
    import torch

    from orcinus.bench.floor import measure_device
    from orcinus.bench.own_thread import on_own_thread
    from orcinus.bench.report import load_average
    from orcinus.bench.trace_builder import read_model_config
    from orcinus.config import EngineConfig
    from orcinus.executor.platform import resolve_for_config
    from orcinus.thread_policy import applied

    config = EngineConfig(model=model, dtype=dtype, device="cpu")
    resolved = str(resolve_for_config(config)[1]).removeprefix("torch.")
    with open(os.path.join(HARDWARE_DIR, "xeon-2core.json")) as f:
        base = Hardware.from_dict(json.load(f))
    t0 = time.perf_counter()
    # Each measurement on a thread that ends with it (bench/own_thread.py): a peak-rate matmul on
    # this thread would leave an OpenMP team beside the engine's forward thread's for the whole
    # measurement, and libgomp then stops spinning between parallel regions. That slowed every
    # measured iteration by 11-24 % against `bench offline`, which runs the engine alone,
    # and the simulator predicted offline throughput 10-19 % low (docs/benchmarks.md, "Validation,
    # 2026-12-05").
    rates = on_own_thread(measure_device, torch.device("cpu"), getattr(torch, resolved),
                          repeats=3 if quick else 5, name="orcinus-calibrate")
    peak, bandwidth = rates.matmul_flops, rates.copy_bandwidth
    hw = dataclasses.replace(base, name="this-machine", peak_flops=peak, peak_flops_by_dtype={resolved: peak},
                             memory_bandwidth=bandwidth)
    load_before = load_average()
    m = on_own_thread(measure, model, dtype, QUICK if quick else WORKLOADS, name="orcinus-calibrate")
    shape = ModelShape.from_model_config(read_model_config(model), name=model or "default", weights=m.weights)
    if m.weights is not None:  # for the simulator's runs of this model (sim/bench_hooks.target_from)
        store_weight_info(model_key(model, config.quantization, resolved), m.weights)
    source = (f"orcinus bench calibrate on {time.strftime('%Y-%m-%d %H:%M')} UTC: model {shape.name}, {resolved}, "
              f"{len(m.forward)} iterations (up to {max((b.rows for b, _ in m.forward), default=0)} rows) in "
              f"{time.perf_counter() - t0:.0f} s, wall time through the engine's observers, load average "
              f"{load_before} -> {load_average()}, CPU threads {applied().describe()}",
              f"peak rates ({rates.label}): {peak / 1e9:.1f} GFLOP/s matmul, {bandwidth / 1e9:.1f} GB/s copy")
    return fit_and_store(shape, hw, resolved, m, output or calibration_path(), source)


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
        json.dump(hw.to_dict() | {"model_weights": dataclasses.asdict(m.weights) if m.weights else None,
                                  "calibration_samples": {
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
    weights = WeightInfo(**stored["model_weights"]) if stored.get("model_weights") else None
    shape = dataclasses.replace(shape, weights=weights)
    m = Measured([(BatchShape(int(t), int(r), int(s), k, int(kv)), sec) for t, r, s, k, kv, sec in samples["forward"]],
                 [(int(r), sec) for r, sec in samples["engine_own"]], weights=weights)
    source = tuple(x for x in hw.sources if not x.startswith("efficiencies and overhead fitted"))
    return fit_and_store(shape, hw, resolved, m, output or calibration_path(), (*source, f"refit from {samples_path}"))
