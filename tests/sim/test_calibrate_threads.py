"""`bench calibrate` measures on threads that end with each measurement, never on the caller's
thread: a peak-rate matmul on the main thread left an OpenMP team there beside the engine's
forward thread's, which slowed every calibrated iteration by 11-24 % against `bench offline` (which
runs the engine alone) and biased the simulator's predictions (docs/benchmarks.md, "Validation,
2026-12-05")."""
from __future__ import annotations

import threading

import torch

from orcinus.bench import floor
from orcinus.sim import calibrate
from orcinus.sim.cost_model import BatchShape


def test_peak_rates_and_iterations_are_measured_on_threads_that_end(monkeypatch, tmp_path) -> None:
    ran_on: dict[str, threading.Thread] = {}

    def fake_rates(device, dtype, **kwargs):
        ran_on["rates"] = threading.current_thread()
        # parallel work, as the real measurement does: it would leave a team on this thread
        torch.ones(64, 64) @ torch.ones(64, 64)
        return floor.DeviceRates(20e9, 300e9, "cpu (fake)")

    def fake_measure(model, dtype, workloads, seed=0):
        ran_on["iterations"] = threading.current_thread()
        m = calibrate.Measured()
        for rows in (1, 2, 4, 8, 16, 32, 64):
            for ctx in (32, 256):
                b = BatchShape.of([(1, ctx, True)] * rows)
                m.forward.append((b, 0.03 + 0.004 * rows))
                m.overhead.append((rows, 0.001))
        for tokens in (64, 256):
            b = BatchShape.of([(tokens, 0, True)])
            m.forward.append((b, 0.03 + 0.002 * tokens))
            m.overhead.append((1, 0.001))
        return m

    monkeypatch.setattr(floor, "measure_device", fake_rates)
    monkeypatch.setattr(calibrate, "measure", fake_measure)
    out = tmp_path / "hw.json"
    cal = calibrate.calibrate_this_machine(quick=True, output=str(out))
    assert out.exists() and cal.iterations == 16
    assert set(ran_on) == {"rates", "iterations"}
    for what, thread in ran_on.items():
        assert thread is not threading.main_thread(), what
        assert not thread.is_alive(), what  # ended, and its OpenMP team with it
