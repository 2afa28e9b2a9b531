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
from session_servers import serve
from server_helpers import SMALL_SERVER_ARGS


# `server` (default settings, shared with other test folders) lives in tests/conftest.py.
@pytest.fixture(scope="session")
def small_server(tmp_path_factory) -> Iterator[ServerProcess]:
    """Tight limits and an API key (see SMALL_SERVER_ARGS)."""
    yield from serve(tmp_path_factory, "small", *SMALL_SERVER_ARGS)


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
