"""SIGTERM / Ctrl-C: stop accepting, let requests in flight finish (or, past the grace period,
abort them cleanly), exit 0.

A server of its own (stopping is the point), on a tiny random-weight checkpoint without a
tokenizer so that it starts in seconds; prompts are token ids.
"""
from __future__ import annotations

import json
import signal

import httpx
import pytest

from server_helpers import assert_openai_error, log_tail, start_server, wait_until


def _signal_mid_stream(srv, sig: signal.Signals) -> list[str]:
    """Start a long streamed request, send `sig` once its first event arrives, return the
    `data:` lines that followed. (No tokenizer means no text; log-probs make every token an event.)"""
    body = {"prompt": [5, 6, 7], "max_tokens": 500, "ignore_eos": True, "stream": True, "logprobs": 0}
    with httpx.Client(base_url=srv.base_url, timeout=60) as client:
        with client.stream("POST", "/v1/completions", json=body) as resp:
            lines = resp.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            srv.proc.send_signal(sig)
            return [line for line in lines if line.startswith("data: ")]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_gracefully(checkpoint_factory, tmp_path, sig: signal.Signals) -> None:
    folder, _ = checkpoint_factory("llama")
    log = tmp_path / "server.log"
    srv = start_server(log, "--model", folder, "--skip-tokenizer-init", "--served-model-name", "tiny")
    try:
        rest = _signal_mid_stream(srv, sig)
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"
        assert len(rest) > 2  # the request was cut short by nothing
        assert srv.proc.wait(timeout=60) == 0, log_tail(log)
        assert "waiting for 1 request(s) in flight" in log.read_text()  # it was in flight at the signal
        with pytest.raises(httpx.ConnectError):
            httpx.get(srv.base_url + "/health", timeout=5)
    finally:
        srv.stop()


def test_requests_past_the_grace_period_are_aborted_cleanly(checkpoint_factory, tmp_path) -> None:
    """With no grace period, the request in flight ends at once, but properly: an error event
    and [DONE], not a cut connection; the process still exits 0."""
    folder, _ = checkpoint_factory("llama")
    log = tmp_path / "server.log"
    srv = start_server(log, "--model", folder, "--skip-tokenizer-init", "--shutdown-timeout", "0")
    try:
        rest = _signal_mid_stream(srv, signal.SIGTERM)
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][6:])["error"]["code"] == "engine_unavailable"
        assert srv.proc.wait(timeout=60) == 0, log_tail(log)
        assert "Traceback" not in log.read_text()
    finally:
        srv.stop()


def test_new_requests_during_shutdown_get_503(checkpoint_factory, tmp_path) -> None:
    """While a request in flight drains after SIGTERM, the server still answers new requests,
    with a 503 a client can act on (not a refused connection), and /health says it is going."""
    folder, _ = checkpoint_factory("llama")
    log = tmp_path / "server.log"
    srv = start_server(log, "--model", folder, "--skip-tokenizer-init")
    body = {"prompt": [5, 6, 7], "max_tokens": 500, "ignore_eos": True, "stream": True, "logprobs": 0}
    try:
        with httpx.Client(base_url=srv.base_url, timeout=60) as client:
            with client.stream("POST", "/v1/completions", json=body) as resp:
                lines = resp.iter_lines()
                assert next(line for line in lines if line.startswith("data: "))
                srv.proc.send_signal(signal.SIGTERM)
                assert wait_until(lambda: "new requests get 503" in log.read_text(), 30)
                with httpx.Client(base_url=srv.base_url, timeout=10) as other:
                    refused = other.post("/v1/completions", json={"prompt": [1], "max_tokens": 1})
                    health = other.get("/health")
                rest = [line for line in lines if line.startswith("data: ")]
        err = assert_openai_error(refused, 503, code="shutting_down")
        assert refused.headers["retry-after"] and "shutting down" in err["message"]
        assert health.status_code == 503 and health.json()["reason"] == "the server is shutting down"
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"  # the drain let it finish
        assert srv.proc.wait(timeout=60) == 0, log_tail(log)
    finally:
        srv.stop()
