"""`bench offline`'s report: measured ratios with the trace's bound, no targets, and a warning
when a timed run is too short to compare."""
from __future__ import annotations

from orcinus.bench.offline import MIN_COMPARABLE_S, BackendResult, OfflineReport


def _report(orca_s: float, static_s: float) -> OfflineReport:
    report = OfflineReport(settings={}, trace={}, machine={}, command="orcinus bench offline")
    report.results = [BackendResult("orca", elapsed_s=orca_s, output_tokens=1000),
                      BackendResult("static", elapsed_s=static_s, output_tokens=1000)]
    report.floor = {"seconds": 1.0, "num_iterations": 200, "static_batch_iterations": 250, "rates": {"label": "cpu",
                    "copy_bandwidth": 1e10, "matmul_flops": 1e11}, "output_tokens_per_s": 1000.0,
                    "memory_seconds": 0.5, "compute_seconds": 0.5}
    return report


def test_ratio_and_bound_without_targets() -> None:
    text = _report(orca_s=20.0, static_s=25.0).to_markdown()
    assert "orca / static: 1.25× measured (bound at a fixed cost per iteration: ≤ 1.25×)" in text
    assert "target" not in text
    assert "warning" not in text


def test_short_runs_are_flagged() -> None:
    report = _report(orca_s=MIN_COMPARABLE_S / 10, static_s=MIN_COMPARABLE_S * 2)
    assert len(report.warnings()) == 1 and "orca" in report.warnings()[0] and "static" not in \
        report.warnings()[0].split("(")[1].split(")")[0]
    assert "warning: timed runs shorter than" in report.to_markdown()
