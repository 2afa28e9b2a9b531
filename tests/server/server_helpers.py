"""Helpers for the server tests: starting and stopping `orcinus serve`, reading metrics, errors."""
from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Callable

import httpx

from orcinus.bench.server_process import ServerProcess

STARTUP_TIMEOUT_S = 240.0
STOP_TIMEOUT_S = 60.0

# The small server: one sequence runs at a time and one may wait (a third is refused), an API
# key, a small body limit, and a short context so that fuzzed requests stay cheap.
API_KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
SMALL_MAX_REQUEST_BYTES = 65536
SMALL_SERVER_ARGS = ("--api-key", API_KEY, "--max-num-seqs", "1", "--max-waiting-requests", "1",
                     "--max-model-len", "1024", "--default-max-tokens", "8",
                     "--max-request-bytes", str(SMALL_MAX_REQUEST_BYTES), "--served-model-name", "tiny", "other-name",
                     "--log-stats-interval", "1")


def start_server(log_path: Path, *args: str) -> ServerProcess:
    return ServerProcess(engine_args=list(args), log_path=str(log_path), startup_timeout_s=STARTUP_TIMEOUT_S).start()


def stop_server(server: ServerProcess) -> int:
    """SIGTERM, wait, and return the exit code (0 is a graceful stop)."""
    server.stop(timeout_s=STOP_TIMEOUT_S)
    return server.proc.returncode


def log_tail(log_path: Path, lines: int = 40) -> str:
    return "\n".join(log_path.read_text(errors="replace").splitlines()[-lines:])


def metric(text: str, name: str) -> float:
    """Sum of a metric over its label sets."""
    pattern = re.compile(rf"^{re.escape(name)}(\{{[^}}]*\}})? ")
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if pattern.match(line))


def wait_until(predicate: Callable[[], bool], timeout_s: float, interval_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()


def assert_openai_error(resp: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


# Two tools the tool-calling tests offer (tests/server/test_structured_server.py, test_tool_streaming_server.py)
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"tz": {"type": "string", "maxLength": 10}},
                                       "required": ["tz"], "additionalProperties": False}}}
