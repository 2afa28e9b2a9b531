"""Many clients at once, and clients that leave: the iteration-level loop behind the endpoint."""
from __future__ import annotations

import asyncio
import json
import socket

import httpx
import openai
import pytest

from orcinus.bench.server_process import ServerProcess
from server_helpers import metric, wait_until

NUM_CONCURRENT = 32
MAX_TOKENS = 8


def _prompts() -> list[str]:
    subjects = ["the sea", "a cat", "winter", "trains", "the moon", "bread", "rivers", "music"]
    forms = ["A short poem about {}:", "Three facts about {}:", "Once, {} said", "Why is {}"]
    return [f.format(s) for f in forms for s in subjects][:NUM_CONCURRENT]


@pytest.fixture(scope="module")
def offline_greedy(default_llm) -> dict[str, str]:
    """The same prompts through the offline API in this process: the reference outputs."""
    from orcinus import SamplingParams

    outs = default_llm.generate(_prompts(), SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False)
    return {o.prompt: o.outputs[0].text for o in outs}


def test_concurrent_streams_equal_offline_greedy(server: ServerProcess, model_name: str,
                                                 offline_greedy: dict[str, str]) -> None:
    async def one(client: openai.AsyncOpenAI, prompt: str) -> tuple[str, str | None, int]:
        text, reason, chunks = "", None, 0
        stream = await client.completions.create(model=model_name, prompt=prompt, max_tokens=MAX_TOKENS,
                                                 temperature=0, stream=True)
        async for chunk in stream:
            chunks += 1
            text += chunk.choices[0].text
            reason = chunk.choices[0].finish_reason or reason
        return text, reason, chunks

    async def run_all() -> list[tuple[str, str | None, int]]:
        async with openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0,
                                      timeout=180) as client:
            return await asyncio.gather(*(one(client, p) for p in _prompts()))

    results = asyncio.run(run_all())
    assert len(results) == NUM_CONCURRENT
    for prompt, (text, reason, chunks) in zip(_prompts(), results):
        assert reason in ("stop", "length")
        assert chunks >= 1
        assert text == offline_greedy[prompt], prompt


def _kv_state(server: ServerProcess) -> tuple[float, float, float]:
    """(running sequences, KV cache usage, tokens generated so far), as /metrics shows them."""
    text = httpx.get(server.base_url + "/metrics", timeout=10).text
    return (metric(text, "orcinus:num_requests_running"), metric(text, "orcinus:kv_cache_usage_perc"),
            metric(text, "orcinus:generation_tokens_total"))


def _aborts(server: ServerProcess) -> float:
    text = httpx.get(server.base_url + "/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("orcinus:request_success_total{") and 'finished_reason="abort"' in line)


def _idle(server: ServerProcess) -> bool:
    running, usage, _ = _kv_state(server)
    return running == 0 and usage == 0


def test_streaming_disconnect_frees_blocks(server: ServerProcess, model_name: str) -> None:
    assert wait_until(lambda: _idle(server), 30)
    aborts = _aborts(server)
    body = {"model": model_name, "prompt": "Tell me a very long story.", "max_tokens": 2000, "ignore_eos": True,
            "stream": True}
    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        with client.stream("POST", "/v1/completions", json=body) as resp:
            lines = resp.iter_lines()
            seen = 0
            for line in lines:
                seen += line.startswith("data: ")
                if seen >= 3:
                    break
            running, usage, _ = _kv_state(server)
            assert running == 1 and usage > 0
        # Leaving the `with` closes the connection mid-stream.
    assert wait_until(lambda: _idle(server), 15), _kv_state(server)
    assert _aborts(server) == aborts + 1


def test_non_streaming_disconnect_frees_blocks(server: ServerProcess, model_name: str) -> None:
    assert wait_until(lambda: _idle(server), 30)
    body = json.dumps({"model": model_name, "prompt": "Tell me a very long story.", "max_tokens": 2000,
                       "ignore_eos": True}).encode()
    host, port = server.base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        assert wait_until(lambda: _kv_state(server)[0] == 1, 30)
    assert wait_until(lambda: _idle(server), 15), _kv_state(server)
