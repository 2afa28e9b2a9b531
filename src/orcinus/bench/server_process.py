"""Starts `orcinus serve` as a child process for a benchmark, and stops it again.

The sweep (and the tests) talk to the server only over HTTP, exactly as any client would; this
file only knows the command line, the port and the `/health` endpoint.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Sequence

import httpx


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServerProcess:
    engine_args: Sequence[str] = ()  # e.g. ["--scheduler-policy", "orca", "--max-num-seqs", "8"]
    port: int = 0  # 0: pick a free one
    host: str = "127.0.0.1"  # where the client connects
    log_path: str | None = None  # server stdout+stderr; None: discarded
    startup_timeout_s: float = 300.0
    proc: subprocess.Popen | None = field(default=None, init=False)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        # Only --port: the server's default host serves 127.0.0.1 whatever it binds.
        return [sys.executable, "-m", "orcinus", "serve", "--port", str(self.port), *self.engine_args]

    def start(self) -> "ServerProcess":
        if not self.port:
            self.port = free_port()
        out = open(self.log_path, "w") if self.log_path else subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen(self.command(), stdout=out, stderr=subprocess.STDOUT,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
        finally:
            if out is not subprocess.DEVNULL:
                out.close()  # the child holds its own copy of the descriptor
        try:
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"`{' '.join(self.command())}` exited with {self.proc.returncode} before it "
                                   f"was healthy{self._log_hint()}")
            try:
                if httpx.get(self.base_url + "/health", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"the server was not healthy within {self.startup_timeout_s:.0f} s{self._log_hint()}")

    def _log_hint(self) -> str:
        return f" (see {self.log_path})" if self.log_path else ""

    def stop(self, timeout_s: float = 20.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
