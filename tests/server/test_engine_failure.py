"""A failing device (issue 8, items 1 and 2): a failed iteration tells each of its clients only
about its own request, never another's id; an engine whose batches keep failing as a whole (every
request also failing alone, so not one request's fault) takes the process down with a non-zero
status, so that a supervisor restarts it instead of it answering 503 for ever.

A real server process (faulty_serve.py: `orcinus serve` whose model runner fails on chosen
requests) on a tiny random-weight checkpoint without a tokenizer.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import httpx

from orcinus.bench.server_process import ServerProcess
from server_helpers import STARTUP_TIMEOUT_S, assert_openai_error, log_tail

FAULTY_SERVE = Path(__file__).with_name("faulty_serve.py")


class FaultyServer(ServerProcess):
    def command(self) -> list[str]:
        return [sys.executable, str(FAULTY_SERVE), "--port", str(self.port), *self.engine_args]


def test_failures_reveal_no_other_request_and_a_dead_engine_exits_nonzero(checkpoint_factory, tmp_path) -> None:
    folder, _ = checkpoint_factory("llama")
    log = tmp_path / "server.log"
    srv = FaultyServer(engine_args=["--model", folder, "--skip-tokenizer-init"], log_path=str(log),
                       startup_timeout_s=STARTUP_TIMEOUT_S).start()
    try:
        with httpx.Client(base_url=srv.base_url, timeout=60) as client:
            alice = {"prompt": [5, 6, 7], "max_tokens": 400, "ignore_eos": True, "stream": True, "logprobs": 0}
            with client.stream("POST", "/v1/completions", json=alice, headers={"X-Request-Id": "alice"}) as stream:
                lines = stream.iter_lines()
                assert next(line for line in lines if line.startswith("data: "))  # alice is running
                # bob joins alice's batch and the device is lost: that iteration fails for both,
                # and so do their re-runs in isolation.
                bob = client.post("/v1/completions", json={"prompt": [1, 2], "max_tokens": 4},
                                  headers={"X-Request-Id": "bob-doom"})
                rest = [line for line in lines if line.startswith("data: ")]
            bob_error = assert_openai_error(bob, 500)
            assert "alice" not in bob.text
            alice_error = json.loads(rest[-2][6:])["error"]
            assert rest[-1] == "data: [DONE]" and "bob" not in rest[-2]
            assert "RuntimeError" in alice_error["message"] and "RuntimeError" in bob_error["message"]
            health = client.get("/health")  # one failed batch is not a dead engine
            assert health.status_code == 200 and "alice" not in health.text and "bob" not in health.text
            # Two more whole batches failing in a row (n=2: two sequences in one batch, each failing
            # alone too): the engine is dead and the process exits non-zero.
            for name in ("next-1", "next-2"):
                resp = client.post("/v1/completions", json={"prompt": [1, 2], "max_tokens": 2, "n": 2},
                                   headers={"X-Request-Id": name})
                assert resp.status_code in (500, 503), resp.text
        assert srv.proc.wait(timeout=60) == 1, log_tail(log)
        text = log.read_text()
        assert "the engine is dead" in text and "exiting with status 1" in text
    finally:
        srv.stop()
