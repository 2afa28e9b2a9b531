"""With an API key, everything but /health needs it (issue 19, finding 4): /metrics' prefix-cache
counters told another client's secret prompt apart in a few guesses, so Prometheus scrapes with
the key unless the operator opens /metrics with --public-metrics. The app in-process."""
from __future__ import annotations

from typing import Iterator

import pytest
from fastapi.testclient import TestClient

from orcinus.config import EngineConfig
from orcinus.engine.async_engine import AsyncEngine
from orcinus.engine.llm_engine import LLMEngine
from orcinus.server.app import create_app
from orcinus.server.settings import ServerSettings, add_serve_args, settings_from_args

KEY = "s3cret"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROTECTED = ("/metrics", "/version", "/openapi.json", "/docs", "/v1/models")


@pytest.fixture(scope="module")
def engine(checkpoint_factory) -> LLMEngine:
    folder, _ = checkpoint_factory("llama")
    return LLMEngine(EngineConfig(model=folder, skip_tokenizer_init=True, max_num_seqs=4))


def _client(engine: LLMEngine, **settings) -> Iterator[TestClient]:
    app = create_app(AsyncEngine(engine), ServerSettings(served_model_names=["tiny"], api_key=KEY, **settings))
    with TestClient(app) as client:
        yield client


def _prefix_hits(client: TestClient) -> float:
    text = client.get("/metrics", headers=AUTH).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("orcinus:prefix_cache_hits") and not line.startswith("#"))


def test_everything_but_health_needs_the_key(engine: LLMEngine) -> None:
    for client in _client(engine):
        assert client.get("/health").status_code == 200
        for path in PROTECTED:
            resp = client.get(path)
            assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key", path
            assert client.get(path, headers=AUTH).status_code == 200, path
        # The side channel, scaled down: a guess that shares the victim's prefix moves the
        # hit counter; without the key the counter cannot be read at all.
        body = {"prompt": list(range(3, 40)), "max_tokens": 1}
        assert client.post("/v1/completions", json=body, headers=AUTH).status_code == 200
        before = _prefix_hits(client)
        assert client.post("/v1/completions", json=body, headers=AUTH).status_code == 200
        assert _prefix_hits(client) > before  # what an attacker would read, had it the key
        assert client.get("/metrics").status_code == 401


def test_public_metrics_opens_metrics_only(engine: LLMEngine) -> None:
    for client in _client(engine, public_metrics=True):
        assert client.get("/metrics").status_code == 200
        assert client.get("/health").status_code == 200
        for path in ("/version", "/openapi.json", "/v1/models"):
            assert client.get(path).status_code == 401, path


def test_the_flag() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_serve_args(parser)
    assert settings_from_args(parser.parse_args(["--api-key", "k", "--public-metrics"]), None).public_metrics
    assert not settings_from_args(parser.parse_args(["--api-key", "k"]), None).public_metrics
