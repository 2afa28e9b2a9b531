"""`python -m orcinus.bench.control_plane` runs (issue 19: it crashed on a renamed field,
untested since) and reports one row per batch size."""
from __future__ import annotations

import subprocess
import sys

from orcinus.bench.control_plane import measure


def test_measure_reports_positive_costs() -> None:
    result = measure(3, iterations=5)
    assert result.build_us > 0 and result.round_trip_us > 0 and result.message_bytes > 0


def test_the_module_runs_as_documented() -> None:
    proc = subprocess.run([sys.executable, "-m", "orcinus.bench.control_plane", "--requests", "1", "4",
                           "--iterations", "3"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [row.split("|")[1].strip() for row in rows] == ["1", "4"]
