"""Property-based fuzzing of the server against its own OpenAPI schema: no input gets a 5xx.

Two bounded runs of the schemathesis CLI against the small server: every operation's boundary
and invalid values (cheap: all refused), then random valid requests, a fixed number per
operation, made cheap to serve by schemathesis_hooks.py. Seeds are fixed so a failure replays.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from orcinus.bench.server_process import ServerProcess
from server_helpers import API_KEY

HOOKS = Path(__file__).with_name("schemathesis_hooks.py")
# The runs are bounded by example counts, not by time; this only catches a hang (a loaded 2-core
# machine may take several times the usual minute, and that is no failure of the server).
HANG_GUARD_S = 1500


def _schemathesis(server: ServerProcess, tmp_path: Path, *args: str) -> None:
    cmd = [sys.executable, "-m", "schemathesis.cli", "run", f"{server.base_url}/openapi.json",
           "-H", f"Authorization: Bearer {API_KEY}", "--checks", "not_a_server_error", "--workers", "1",
           "--request-timeout", "600", "--no-shrink", "--seed", "20240611", "--generation-database", "none",
           "--no-color", *args]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": str(HOOKS)}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert proc.returncode == 0, f"schemathesis found problems:\n{proc.stdout[-6000:]}\n{proc.stderr[-2000:]}"
    assert "No issues found" in proc.stdout, proc.stdout[-3000:]


@pytest.mark.slow
@pytest.mark.timeout(2 * HANG_GUARD_S + 60)
def test_no_input_gets_a_server_error(small_server: ServerProcess, tmp_path: Path) -> None:
    _schemathesis(small_server, tmp_path, "--phases", "coverage", "--mode", "negative")
    _schemathesis(small_server, tmp_path, "--phases", "fuzzing,stateful", "--mode", "all", "--max-examples", "25")
