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
