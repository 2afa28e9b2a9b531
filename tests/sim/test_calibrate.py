"""Calibration recovers known efficiencies and overheads from synthetic measurements."""
from __future__ import annotations

import random

import pytest

from orcinus.sim.calibrate import fit_efficiencies, fit_overhead
from orcinus.sim.cost_model import BatchShape, CostModel, Parallel
from orcinus.sim.hardware import load_hardware
from orcinus.sim.shapes import ModelShape

SHAPE = ModelShape("smol", num_layers=30, hidden_size=576, num_heads=9, num_kv_heads=3, head_dim=64,
                   intermediate_size=1536, vocab_size=49152, max_position_embeddings=8192)


def _samples(cost: CostModel, n: int, seed: int, noise: float) -> list[tuple[BatchShape, float]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        if rng.random() < 0.4:  # prompts: compute-bound GEMMs
            rows = [(rng.randint(64, 512), 0, True) for _ in range(rng.randint(1, 4))]
        else:  # decodes: memory-bound GEMMs, attention over long contexts
            rows = [(1, rng.randint(16, 2000), True) for _ in range(rng.randint(1, 64))]
        b = BatchShape.of(rows)
        out.append((b, cost.iteration_seconds(b) * (1 + rng.uniform(-noise, noise))))
    return out


@pytest.mark.parametrize("truth", [{"gemm": 0.55, "memory": 0.35, "attention": 0.2},
                                   {"gemm": 0.9, "memory": 0.7, "attention": 0.05}])
def test_fit_recovers_known_efficiencies(truth: dict[str, float]) -> None:
    hw = load_hardware("xeon-2core").with_efficiency(truth)
    samples = _samples(CostModel(SHAPE, hw, Parallel(), "bfloat16"), 200, seed=1, noise=0.02)
    base = CostModel(SHAPE, load_hardware("xeon-2core"), Parallel(), "bfloat16")  # starts from other values
    eff = fit_efficiencies(base, samples)
    for cls, value in truth.items():
        assert eff[cls] == pytest.approx(value, rel=0.05), (cls, eff)


def test_fit_overhead_recovers_a_line() -> None:
    rng = random.Random(0)
    samples = [(r, 0.002 + 1e-4 * r + rng.uniform(-1e-5, 1e-5)) for r in (rng.randint(1, 64) for _ in range(100))]
    o = fit_overhead(samples)
    assert o.iteration_s == pytest.approx(0.002, rel=0.02) and o.per_row_s == pytest.approx(1e-4, rel=0.02)


def test_fit_with_a_fixed_forward_cost_recovers_it_and_the_efficiencies() -> None:
    truth = {"gemm": 0.6, "memory": 0.5, "attention": 0.2}
    cost = CostModel(SHAPE, load_hardware("xeon-2core").with_efficiency(truth), Parallel(), "bfloat16")
    samples = [(b, t + 0.004 + 2e-4 * b.rows) for b, t in _samples(cost, 300, seed=2, noise=0.0)]
    eff, fixed = fit_efficiencies(CostModel(SHAPE, load_hardware("xeon-2core"), Parallel(), "bfloat16"), samples,
                                  with_fixed=True)
    for cls, value in truth.items():
        assert eff[cls] == pytest.approx(value, rel=0.05), (cls, eff)
    assert fixed.iteration_s == pytest.approx(0.004, rel=0.1) and fixed.per_row_s == pytest.approx(2e-4, rel=0.1)


def test_fit_recovers_the_quantized_path_and_the_fixed_costs() -> None:
    """A model held in Q4_1/Q8_0 blocks (the default model's layout): the integer kernel below the
    crossover, the dequantisation from it up, fixed and per-row costs, recovered together."""
    from orcinus.sim.weight_bytes import WeightInfo

    elements = SHAPE.layer_linear_params
    head = SHAPE.vocab_size * SHAPE.hidden_size
    quant = ModelShape(**{**SHAPE.__dict__, "weights": WeightInfo(elements / 32 * 20 + 4608, head / 32 * 34,
                                                                 head / 32 * 34, elements, head, 32)})
    truth = {"gemm": 0.7, "memory": 0.3, "attention": 0.25, "qdot": 0.2, "dequant": 0.4}
    cost = CostModel(quant, load_hardware("xeon-2core").with_efficiency(truth), Parallel(), "float32")
    samples = [(b, t + 0.003 + 3e-4 * b.rows) for b, t in _samples(cost, 300, seed=3, noise=0.0)]
    assert {b.tokens >= 32 for b, _ in samples} == {True, False}  # both sides of the crossover
    eff, fixed = fit_efficiencies(CostModel(quant, load_hardware("xeon-2core"), Parallel(), "float32"), samples,
                                  with_fixed=True)
    for cls in ("gemm", "qdot", "dequant"):
        assert eff[cls] == pytest.approx(truth[cls], rel=0.05), (cls, eff)
    assert fixed.iteration_s == pytest.approx(0.003, rel=0.1) and fixed.per_row_s == pytest.approx(3e-4, rel=0.1)
    fitted = CostModel(quant, load_hardware("xeon-2core").with_efficiency(eff, fixed), Parallel(), "float32")
    errs = [abs(fitted.iteration_seconds(b) + fixed.seconds(b.rows, b.tokens) - t) / t for b, t in samples]
    assert max(errs) < 0.02


def test_measure_times_every_iteration_through_the_observers(checkpoint_factory) -> None:
    """On a tiny checkpoint: one timed sample per iteration the engine ran, shapes as launched
    (every prompt token and every output token but the last computed once), times positive."""
    from orcinus.sim.calibrate import Workload, measure

    tiny = checkpoint_factory("llama")[0]
    wl = Workload("t", 4, 6, (5, 12), (2, 6))
    m = measure(tiny, "float32", [wl], seed=1)
    lengths = m.requests
    assert len(lengths) == wl.num_requests
    assert sum(b.tokens for b, _ in m.forward) == sum(p + o - 1 for p, o in lengths)
    assert sum(b.sampled for b, _ in m.forward) == sum(o for _, o in lengths)
    assert max(b.rows for b, _ in m.forward) <= wl.max_num_seqs
    assert all(t > 0 for _, t in m.forward) and len(m.overhead) >= len(m.forward) - 1
    assert m.weights is not None and m.weights.layer_bytes > 0 and not m.weights.quantized
