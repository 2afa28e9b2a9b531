"""`scripts/validate_sim.sh`, issue 23's validation run: it must parse, refuse a missing output
folder, and in `--smoke` mode run every step (calibration, the measured traces, the sweep,
validate-sim) at toy scale and leave the table of every comparison behind."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "validate_sim.sh"

needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="no bash on this machine")


def _env(tmp_path: Path) -> dict[str, str]:
    # this interpreter, and a cache of its own (the calibration's weight bytes are stored there)
    return {**os.environ, "PYTHON": sys.executable, "ORCINUS_CACHE": str(tmp_path / "cache")}


@needs_bash
def test_the_script_parses() -> None:
    done = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@needs_bash
def test_without_an_output_folder_it_says_how_to_run_it(tmp_path) -> None:
    done = subprocess.run(["bash", str(SCRIPT), "--smoke"], capture_output=True, text=True, env=_env(tmp_path))
    assert done.returncode == 2 and "usage: bash scripts/validate_sim.sh [--smoke] OUT_DIR" in done.stderr


@needs_bash
@pytest.mark.slow
def test_smoke_mode_runs_every_step_and_writes_the_table(tmp_path) -> None:
    out = tmp_path / "out"
    done = subprocess.run(["bash", str(SCRIPT), "--smoke", str(out)], capture_output=True, text=True,
                          env=_env(tmp_path), timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    steps = [line.split("\t")[0] for line in (out / "timings.tsv").read_text().splitlines()]
    assert steps == ["calibrate", "offline-A", "offline-B", "offline-C", "sweep", "validate"]
    assert json.loads((out / "this-machine.json").read_text())["name"] == "this-machine"
    rows = json.loads((out / "validate.json").read_text())["comparisons"]
    # three offline traces x four backends, the sweep's two configs x two rates; four metrics each
    assert len(rows) == (3 * 4 + 2 * 2) * 4
    assert {r["config"] for r in rows} >= {"orca", "static", "paged", "paged-chunked"}
    assert all(r["measured"] > 0 and r["predicted"] > 0 for r in rows)
    assert "comparisons within 10 %" in (out / "validate.md").read_text()
