"""`orcinus serve` on the command line, for what needs no model: flags and a taken port."""
from __future__ import annotations

import socket
import subprocess
import sys


def _serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orcinus", "serve", *args], capture_output=True, text=True,
                          timeout=120)


def test_help_lists_the_server_flags() -> None:
    out = _serve("--help").stdout
    for flag in ("--host", "--port", "--api-key", "--max-waiting-requests", "--served-model-name",
                 "--max-request-bytes", "--uvicorn-log-level", "--shutdown-timeout", "--model", "--max-num-seqs"):
        assert flag in out, flag


def test_a_taken_port_fails_fast_before_loading_the_model() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = _serve("--port", str(port))
    assert proc.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr
    assert "orcinus engine:" not in proc.stderr  # the model was never loaded
