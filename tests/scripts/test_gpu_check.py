"""`scripts/gpu_check.sh`, the prepared GPU run: where CI runs there is no CUDA device, so what
can be checked here is that the script parses and stops at once, saying why, without running
the test tier or writing a checkpoint. On a GPU machine the script itself is the check."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"

needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="no bash on this machine")


@needs_bash
def test_the_script_parses():
    done = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@needs_bash
@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here: the script would run the checks")
def test_without_a_gpu_it_stops_at_once_and_says_why(tmp_path):
    # python3 on PATH must be the interpreter that has torch, as on the GPU machines
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(sys.executable)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    out = tmp_path / "out"
    done = subprocess.run(["bash", str(SCRIPT), str(out)], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2
    assert "no CUDA device here" in done.stdout + done.stderr
    assert "no CUDA device here" in (out / "machine.txt").read_text()
    assert not (out / "gpu_tests.log").exists()  # the test tier did not start
