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

from server_helpers import log_tail, start_server


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
        assert "Waiting for connections to close" in log.read_text()  # it was in flight at the signal
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
