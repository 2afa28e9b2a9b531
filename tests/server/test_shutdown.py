"""SIGTERM / Ctrl-C: stop accepting, let the request in flight finish, exit 0.

A server of its own (stopping is the point), on a tiny random-weight checkpoint without a
tokenizer so that it starts in seconds; prompts are token ids.
"""
from __future__ import annotations

import json
import signal

import httpx
import pytest

from server_helpers import log_tail, start_server


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_gracefully(checkpoint_factory, tmp_path, sig: signal.Signals) -> None:
    folder, _ = checkpoint_factory("llama")
    log = tmp_path / "server.log"
    srv = start_server(log, "--model", folder, "--skip-tokenizer-init", "--served-model-name", "tiny")
    try:
        body = {"prompt": [5, 6, 7], "max_tokens": 500, "ignore_eos": True, "stream": True}
        with httpx.Client(base_url=srv.base_url, timeout=60) as client:
            with client.stream("POST", "/v1/completions", json=body) as resp:
                lines = resp.iter_lines()
                assert next(line for line in lines if line.startswith("data: "))
                srv.proc.send_signal(sig)
                rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"
        assert srv.proc.wait(timeout=60) == 0, log_tail(log)
        with pytest.raises(httpx.ConnectError):
            httpx.get(srv.base_url + "/health", timeout=5)
    finally:
        srv.stop()
