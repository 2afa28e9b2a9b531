"""The app in-process (create_app + TestClient) over a tiny checkpoint without a tokenizer:
health follows the engine loop, and what needs a tokenizer says so."""
from __future__ import annotations

import threading
from typing import Iterator

import pytest
from fastapi.testclient import TestClient

from orcinus.config import EngineConfig
from orcinus.engine.async_engine import AsyncEngine
from orcinus.engine.llm_engine import LLMEngine
from orcinus.server.app import create_app
from orcinus.server.settings import ServerSettings
from server_helpers import wait_until


@pytest.fixture
def engine(checkpoint_factory) -> LLMEngine:
    folder, _ = checkpoint_factory("llama")
    return LLMEngine(EngineConfig(model=folder, skip_tokenizer_init=True, max_num_seqs=4))


def _client(engine: LLMEngine, stall_timeout_s: float = 60.0, **settings) -> Iterator[TestClient]:
    app = create_app(AsyncEngine(engine, stall_timeout_s=stall_timeout_s),
                     ServerSettings(served_model_names=["tiny"], **settings))
    with TestClient(app) as client:
        yield client


@pytest.fixture
def client(engine: LLMEngine) -> Iterator[TestClient]:
    yield from _client(engine)


def test_token_prompts_work_without_a_tokenizer(client: TestClient) -> None:
    resp = client.post("/v1/completions", json={"prompt": [[1, 2, 3], [4, 5]], "max_tokens": 3, "ignore_eos": True,
                                                "logprobs": 2})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11}
    assert body["choices"][0]["logprobs"]["tokens"][0].startswith("token_id:")
    for bad in ({"prompt": "text needs a tokenizer"}, {"prompt": [1], "stop": ["x"]}):
        assert client.post("/v1/completions", json=bad).status_code == 400
    chat = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert chat.status_code == 400 and "tokenizer" in chat.json()["error"]["message"]


def test_health_turns_503_when_the_loop_dies(client: TestClient, engine: LLMEngine) -> None:
    assert client.get("/health").json() == {"status": "ok", "reason": None}

    def broken():
        raise RuntimeError("the device fell off")

    engine.step = broken
    for _ in range(3):
        assert client.post("/v1/completions", json={"prompt": [1, 2], "max_tokens": 2}).status_code == 500
    health = client.get("/health")
    assert health.status_code == 503 and health.json()["reason"].startswith("engine dead")
    resp = client.post("/v1/completions", json={"prompt": [1, 2], "max_tokens": 2})
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "engine_unavailable"
    assert "orcinus:engine_healthy 0.0" in client.get("/metrics").text


def test_health_turns_503_while_the_loop_is_stuck(engine: LLMEngine) -> None:
    gate = threading.Event()
    step = engine.step

    def stuck():
        gate.wait(30)
        return step()

    engine.step = stuck
    # Stall timeout well above the idle loop's 0.5 s wake-up, so an idle loop never looks stuck.
    for client in _client(engine, stall_timeout_s=3.0):
        results = []
        worker = threading.Thread(target=lambda: results.append(
            client.post("/v1/completions", json={"prompt": [1, 2], "max_tokens": 2})))
        worker.start()
        assert wait_until(lambda: client.get("/health").status_code == 503, 60)
        assert "made no progress" in client.get("/health").json()["reason"]
        gate.set()
        worker.join(30)
        assert results[0].status_code == 200
        assert wait_until(lambda: client.get("/health").status_code == 200, 60)
