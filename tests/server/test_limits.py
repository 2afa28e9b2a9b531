"""Security and limits, on the small server: API key, waiting-queue bound, body size; and the
log an operator reads."""
from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Iterator

import httpx
import openai
import pytest

from orcinus.bench.server_process import ServerProcess
from server_helpers import API_KEY, AUTH, SMALL_MAX_REQUEST_BYTES as MAX_REQUEST_BYTES, assert_openai_error, \
    metric, wait_until


@pytest.fixture(scope="module")
def http(small_server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=small_server.base_url, timeout=60) as c:
        yield c


def test_api_key_is_enforced(http: httpx.Client, small_server: ServerProcess) -> None:
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 1}
    assert_openai_error(http.post("/v1/completions", json=body), 401, code="invalid_api_key")
    assert_openai_error(http.post("/v1/completions", json=body, headers={"Authorization": "Bearer nope"}), 401)
    assert_openai_error(http.post("/v1/completions", json=body, headers={"Authorization": API_KEY}), 401)
    assert_openai_error(http.get("/v1/models"), 401)
    assert_openai_error(http.post("/v1/completions", content=b"{bad json", headers={}), 401)  # before parsing
    assert http.post("/v1/completions", json=body, headers=AUTH).status_code == 200
    for scheme in ("bearer", "BEARER", "BeArEr"):  # the scheme is case-insensitive (RFC 7235); the key is not
        assert http.post("/v1/completions", json=body, headers={"Authorization": f"{scheme} {API_KEY}"}).status_code \
            == 200
    assert_openai_error(http.get("/v1/models", headers={"Authorization": f"Bearer {API_KEY.upper()}"}), 401)
    assert_openai_error(http.get("/v1/models", headers={"Authorization": f"Basic {API_KEY}"}), 401)
    # Only /health stays open (load balancers); Prometheus scrapes /metrics with the key, and the
    # schema and version are for clients, who have it (issue 19: /metrics told prompts apart).
    assert http.get("/health").status_code == 200
    for path in ("/metrics", "/version", "/openapi.json", "/docs", "/no-such-path"):
        assert_openai_error(http.get(path), 401, code="invalid_api_key")
        assert http.get(path, headers=AUTH).status_code == (404 if path == "/no-such-path" else 200)
    client = openai.OpenAI(base_url=small_server.base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
    assert [m.id for m in client.models.list()] == ["tiny", "other-name"]
    resp = client.chat.completions.create(model="other-name", messages=[{"role": "user", "content": "hi"}])
    assert resp.model == "tiny" and resp.usage.completion_tokens <= 8  # --default-max-tokens
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=small_server.base_url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_body_size_limit(http: httpx.Client) -> None:
    big = {"model": "tiny", "prompt": "x" * (MAX_REQUEST_BYTES + 10), "max_tokens": 1}
    assert_openai_error(http.post("/v1/completions", json=big, headers=AUTH), 413, code="request_too_large")

    def chunked():  # no Content-Length: the limit is enforced on the bytes as they arrive
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(MAX_REQUEST_BYTES // 1024 + 2):
            yield b"x" * 1024
        yield b'", "max_tokens": 1}'

    resp = http.post("/v1/completions", content=chunked(), headers={**AUTH, "content-type": "application/json"})
    assert_openai_error(resp, 413)
    assert http.post("/v1/completions", json={"prompt": "x" * 1000, "max_tokens": 1}, headers=AUTH).status_code == 200


def _waiting(small_server: ServerProcess) -> float:
    return metric(httpx.get(small_server.base_url + "/metrics", headers=AUTH, timeout=10).text, "orcinus:num_requests_waiting")


def test_queue_bound_returns_503(http: httpx.Client, small_server: ServerProcess) -> None:
    long_body = {"prompt": "Count to a thousand:", "max_tokens": 900, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=small_server.base_url, timeout=120, headers=AUTH) as a_client:
        with a_client.stream("POST", "/v1/completions", json=long_body) as running:
            events = running.iter_lines()
            assert next(e for e in events if e.startswith("data: "))  # A is running (max-num-seqs 1)
            waiting_result: dict = {}

            def waiter() -> None:  # B waits behind A
                with httpx.Client(base_url=small_server.base_url, timeout=120, headers=AUTH) as b_client:
                    waiting_result["resp"] = b_client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})

            thread = threading.Thread(target=waiter)
            thread.start()
            assert wait_until(lambda: _waiting(small_server) == 1, 30)
            # C finds the queue full: refused at once, not queued.
            for path, body in (("/v1/completions", {"prompt": "hi", "max_tokens": 2}),
                               ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
                resp = http.post(path, json=body, headers=AUTH, timeout=10)
                assert_openai_error(resp, 503, code="queue_full")
                assert resp.headers["retry-after"]
        # A's client left: B runs and completes.
        thread.join(timeout=60)
    assert waiting_result["resp"].status_code == 200, waiting_result["resp"].text
    assert http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}, headers=AUTH).status_code == 200


def test_operator_log(small_server: ServerProcess) -> None:
    """Start-up line (model, dtype, device, KV capacity, policy), throughput lines while busy, one
    access line per request. The test makes its own traffic: it must pass alone and in any order."""
    import torch

    log = Path(small_server.log_path)
    denied = httpx.post(small_server.base_url + "/v1/completions", json={"prompt": "hi"}, timeout=60)
    assert denied.status_code == 401
    long_body = {"prompt": "Count to a thousand:", "max_tokens": 900, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=small_server.base_url, timeout=120, headers=AUTH) as c:
        with c.stream("POST", "/v1/completions", json=long_body) as running:
            events = running.iter_lines()
            assert next(e for e in events if e.startswith("data: "))  # busy from here on
            # Keep it busy (reading the stream) until a stats tick has logged; leaving aborts it.
            seen = wait_until(lambda: next(events, None) is not None and "throughput:" in log.read_text(), 300,
                              interval_s=0.01)
            assert seen, "no throughput line while the server was busy"
    text = log.read_text()
    startup = next(line for line in text.splitlines() if "kv_capacity=" in line)
    on_gpu = torch.cuda.is_available()  # the server's default device and dtype follow the host
    for field in ("model=", f"dtype={'bfloat16' if on_gpu else 'float32'}", f"device={'cuda' if on_gpu else 'cpu'}",
                  "tokens", "policy=paged", f"max_num_batched_tokens={2048 if on_gpu else 512}", "prefix_caching=on"):
        assert field in startup, startup
    assert "serving tiny, other-name at http://127.0.0.1:" in text
    assert re.search(r'orcinus.access: 127\.0\.0\.1:\d+ "POST /v1/completions HTTP/1.1" 401 \d+B [\d.]+ms', text)
