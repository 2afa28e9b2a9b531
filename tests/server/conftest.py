"""Real `orcinus serve` processes on loopback ports, shared by the server tests.

One server with the default settings (what a user gets) serves most tests; loading the model is
the expensive part, so it lives for the whole session. A second, small server with tight limits
and an API key serves the tests of limits and the fuzzing.
"""
from __future__ import annotations

from typing import Iterator

import httpx
import openai
import pytest

from orcinus.bench.server_process import ServerProcess
from server_helpers import SMALL_SERVER_ARGS, log_tail, start_server, stop_server


def _serve(tmp_path_factory, name: str, *args: str) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("server") / f"{name}.log"
    srv = start_server(log, *args)
    yield srv
    rc = stop_server(srv)
    assert rc == 0, f"the server did not stop gracefully (rc={rc}):\n{log_tail(log)}"


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> Iterator[ServerProcess]:
    """Default settings, as a user gets them."""
    yield from _serve(tmp_path_factory, "main")


@pytest.fixture(scope="session")
def small_server(tmp_path_factory) -> Iterator[ServerProcess]:
    """Tight limits and an API key (see SMALL_SERVER_ARGS)."""
    yield from _serve(tmp_path_factory, "small", *SMALL_SERVER_ARGS)


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
