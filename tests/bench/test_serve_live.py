"""A short `orcinus bench serve` run against a live `orcinus serve` (default model, CPU)."""
import json

import httpx
import pytest

from orcinus.bench.trace_builder import TraceSpec, build_trace
from orcinus.bench.workloads import LengthRange
from orcinus.cli import main


pytestmark = pytest.mark.slow  # a live server of the default model


# `server` is the session's shared `orcinus serve` with default settings (tests/conftest.py).
def test_bench_serve_report_matches_the_server(server, tmp_path, capsys):
    out = tmp_path / "serve.json"
    argv = ["bench", "serve", "--base-url", server.base_url, "--dataset", "random", "--num-requests", "3",
            "--prompt-len", "4:12", "--output-len", "2:5", "--seed", "3", "--request-rate", "50",
            "--goodput", "e2el:600000", "--result-json", str(out), "--save-detailed", "--no-progress",
            "--scrape-metrics", "0.05"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "bench serve result" in printed and "server KV use" in printed
    report = json.loads(out.read_text())
    assert set(report) >= {"settings", "trace", "machine", "command", "metrics", "errors", "requests"}
    m = report["metrics"]
    assert m["completed"] == 3 and m["failed"] == 0 and report["errors"] == []
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms", "normalized_latency_ms"):
        assert set(m[key]) >= {"mean", "median", "p90", "p99"}
    assert m["request_throughput"] > 0 and m["output_throughput"] > 0 and m["goodput"] > 0
    assert report["settings"]["model"]  # discovered from /v1/models
    # the server's own counters, polled from /metrics: a request takes one iteration per token
    kv = report["server_kv"]
    assert kv["samples"] >= 2 and kv["iterations"] >= max(r["output_len"] for r in report["requests"])
    assert kv["preemptions"] == 0 and 0 <= kv["mean_running"] <= 3

    # The same trace, rebuilt from its seed; ask the server again without streaming.
    trace = build_trace(TraceSpec("random", 3, LengthRange(4, 12), LengthRange(2, 5), 3), None)
    assert [r["prompt_len"] for r in report["requests"]] == [r.prompt_len for r in trace]
    assert m["total_output_tokens"] == sum(r.output_len for r in trace)
    for req, seen in zip(trace, report["requests"]):
        body = {"model": report["settings"]["model"], "prompt": req.prompt_token_ids, "max_tokens": req.output_len,
                "temperature": 0.0, "ignore_eos": True}
        resp = httpx.post(server.base_url + "/v1/completions", json=body, timeout=120.0)
        assert resp.status_code == 200, resp.text
        usage = resp.json()["usage"]
        assert seen["output_len"] == usage["completion_tokens"] == req.output_len
        assert usage["prompt_tokens"] == req.prompt_len
        assert 1 <= seen["num_chunks"] <= seen["output_len"]
        assert len(seen["itl"]) == seen["num_chunks"] - 1
        assert seen["latency"] >= seen["ttft"] > 0
