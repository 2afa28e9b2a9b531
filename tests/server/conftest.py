"""Real `orcinus serve` processes on loopback ports, shared by the server tests.

One server with the default settings (what a user gets) serves most tests; loading the model is
the expensive part, so it lives for the whole session. The tests of limits (API key, queue bound,
body size, shutdown) start their own small server in their module.
"""
from __future__ import annotations

from typing import Iterator

import httpx
import openai
import pytest

from orcinus.bench.server_process import ServerProcess
from server_helpers import log_tail, start_server, stop_server


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("server") / "main.log"
    srv = start_server(log)
    yield srv
    rc = stop_server(srv)
    assert rc == 0, f"the server did not stop gracefully (rc={rc}):\n{log_tail(log)}"


@pytest.fixture(scope="session")
def model_name(server: ServerProcess) -> str:
    return httpx.get(server.base_url + "/v1/models", timeout=10).json()["data"][0]["id"]


@pytest.fixture(scope="session")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, timeout=120) as c:
        yield c
