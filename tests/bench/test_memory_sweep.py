"""`bench sweep --target engine` as a memory benchmark on a tiny checkpoint: timed arrivals into a
pool small enough to bind, with KV use sampled every iteration, requests that do not know their
length, and prefix caching on a trace whose prompts share a system prompt."""
import json

import pytest

from orcinus.cli import main

# llama test checkpoint: 2 layers x 2 KV heads x 16 dims x 2 (K and V) x 4 bytes = 512 bytes per token
BYTES_PER_TOKEN = 512


@pytest.fixture(scope="module")
def tiny(checkpoint_factory):
    return checkpoint_factory("llama")[0]


def _points(out):
    data = json.loads((out / "sweep.json").read_text())
    return data, {p["config"]: p for p in data["points"]}


def test_poisson_arrivals_unknown_lengths_small_pool(tiny, tmp_path, capsys):
    out, png = tmp_path / "sweep", tmp_path / "kv.png"
    # 256 slots; Orca reserves max_model_len (128) for a request without max_tokens: two at a time
    argv = ["bench", "sweep", "--target", "engine", "--model", tiny, "--configs", "orca", "paged", "paged-chunked",
            "--rates", "200", "--arrival", "poisson", "--num-requests", "6", "--prompt-len", "20:40",
            "--output-len", "8:16", "--max-model-len", "128", "--kv-cache-memory", str(256 * BYTES_PER_TOKEN),
            "--block-size", "4", "--max-num-batched-tokens", "16", "--no-lengths-known", "--kv-plot", str(png),
            "--output-dir", str(out), "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "KV utilisation % (real / allocated)" in printed and "mean running seqs" in printed
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data, pts = _points(out)
    assert data["lengths_known"] is False and data["machine"]["load_avg_1m_end"] is not None
    assert set(pts) == {"orca", "paged", "paged-chunked"}
    for p in pts.values():
        # every request ended at its trace length although none gave max_tokens
        assert p["completed"] == 6 and p["failed"] == 0
        assert p["output_throughput"] * p["duration_s"] == pytest.approx(data["trace"]["output_tokens"])
        assert p["cpu_s"] > 0 and p["kv"]["iterations"] == len(p["kv_samples"]) > 0
        assert all(s["real_slots"] <= s["allocated_slots"] <= 256 for s in p["kv_samples"])
        # every prompt token is computed or found cached (the warm-up request may leave a block of
        # the first prompt), and recomputed again after a preemption
        assert p["kv"]["prompt_tokens_computed"] + p["kv"]["prefix_cache_hits"] >= data["trace"]["prompt_tokens"]
    assert max(s["running"] for s in pts["orca"]["kv_samples"]) <= 2
    assert max(s["running"] for s in pts["paged"]["kv_samples"]) > 2
    assert pts["paged"]["kv"]["mean_utilisation"] > pts["orca"]["kv"]["mean_utilisation"]
    # the chunked config's iterations keep to its 16-token budget; without one a 20+-token prompt runs whole
    assert max(s["max_batch_tokens"] for s in pts["paged-chunked"]["kv_samples"]) <= 16
    assert max(s["max_batch_tokens"] for s in pts["paged"]["kv_samples"]) > 16
    assert all(sum(s["tokens"] for s in p["kv_samples"]) == p["kv"]["tokens_computed"] for p in pts.values())


def test_shared_prefix_trace_with_and_without_prefix_caching(tiny, tmp_path):
    out = tmp_path / "sweep"
    # prompts: the shared 32 tokens + 8..12 of their own, i.e. at least 2 full blocks of 4 of their own
    argv = ["bench", "sweep", "--target", "engine", "--model", tiny, "--configs",
            "cache=--enable-prefix-caching", "nocache=--no-enable-prefix-caching", "--rates", "inf,200",
            "--dataset", "random", "--shared-prefix-len", "32", "--num-requests", "5", "--prompt-len", "8:12",
            "--output-len", "2:4", "--block-size", "4", "--output-dir", str(out), "--no-progress"]
    assert main(argv) == 0
    data = json.loads((out / "sweep.json").read_text())
    prompt_tokens = data["trace"]["prompt_tokens"]
    assert data["trace"]["shared_prefix_len"] == 32
    pts = {(p["config"], p["rate"]): p for p in data["points"]}
    assert len(pts) == 4 and all(p["completed"] == 5 for p in pts.values())
    for rate in ("inf", 200):
        on, off = pts["cache", rate]["kv"], pts["nocache", rate]["kv"]
        assert off["prefix_cache_hits"] == 0 and off["prompt_tokens_computed"] == prompt_tokens
        # with caching, the shared system prompt's blocks are computed once and found by the others
        assert on["prefix_cache_hits"] >= 4 * 32 and on["prefix_cache_hit_rate"] > 0
        assert on["prompt_tokens_computed"] == prompt_tokens - on["prefix_cache_hits"]
        # ... and only those: the second rate replays the same prompts, yet finds none of their own
        # blocks, because every rate starts with an empty cache
        assert on["prefix_cache_hits"] <= 5 * 32


def test_server_target_refuses_engine_only_flags(tiny, tmp_path, capsys):
    argv = ["bench", "sweep", "--target", "server", "--model", tiny, "--configs", "orca", "--rates", "inf",
            "--no-lengths-known", "--output-dir", str(tmp_path), "--no-progress"]
    assert main(argv) == 2
    assert "--target engine" in capsys.readouterr().err


@pytest.mark.slow
def test_server_target_fresh_server_per_rate_and_kv_from_metrics(tiny, tmp_path, capsys):
    # each rate replays the same prompts: one server for all rates would answer the later ones
    # from the prefix cache the earlier ones filled
    png = tmp_path / "kv.png"
    argv = ["bench", "sweep", "--target", "server", "--model", tiny, "--configs", "paged", "--rates", "inf,100",
            "--dataset", "random", "--shared-prefix-len", "32", "--num-requests", "3", "--prompt-len", "8:12",
            "--output-len", "4:6", "--block-size", "4", "--kv-plot", str(png), "--output-dir", str(tmp_path),
            "--no-progress"]
    assert main(argv) == 0
    assert "/metrics, polled" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.glob("server_*.log")) == ["server_paged_100.log", "server_paged_inf.log"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((tmp_path / "sweep.json").read_text())
    assert [p["completed"] for p in data["points"]] == [3, 3]
    for p in data["points"]:
        kv = p["kv"]  # polled from the server's /metrics
        assert kv["samples"] == len(p["kv_samples"]) >= 2 and kv["iterations"] >= 6
        # later requests find the shared 32 tokens, but never their own blocks from an earlier rate
        assert 32 <= kv["prefix_cache_hits"] <= 3 * 32
