"""`bench offline` with the memory backends on a tiny checkpoint and a pool small enough to bind:
per-iteration KV samples, the utilisation plot, and requests without max_tokens that end at their
trace length (Orca must reserve the whole context for them, paged allocation need not)."""
import json

from orcinus.cli import main


def test_memory_backends_record_kv_use_and_plot(checkpoint_factory, tmp_path, capsys):
    tiny = checkpoint_factory("llama")[0]
    out, png = tmp_path / "mem.json", tmp_path / "kv.png"
    # llama test checkpoint: 2 layers x 2 KV heads x 16 dims x 2 x 4 bytes = 512 bytes per token;
    # 256 slots: Orca reserves max_model_len (128) per request, so two run at once
    argv = ["bench", "offline", "--model", tiny, "--num-requests", "6", "--prompt-len", "20:40",
            "--output-len", "8:16", "--max-model-len", "128", "--kv-cache-memory", str(256 * 512),
            "--block-size", "4", "--backends", "orca,paged,paged-chunked", "--no-lengths-known", "--no-floor",
            "--max-num-batched-tokens", "16", "--kv-plot", str(png), "--output-json", str(out), "--no-progress"]
    assert main(argv) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "KV utilisation" in capsys.readouterr().out
    report = json.loads(out.read_text())
    res = {r["backend"]: r for r in report["results"]}
    assert all(r["status"] == "ok" and r["output_tokens"] == report["trace"]["output_tokens"] for r in res.values())
    for r in res.values():
        assert r["kv"]["iterations"] == len(r["kv_samples"]) > 0
        assert all(s["real_slots"] <= s["allocated_slots"] <= 256 for s in r["kv_samples"])
    # Orca reserves 128 slots per request: at most two run; paged admits on the prompt alone
    assert max(s["running"] for s in res["orca"]["kv_samples"]) <= 2
    assert max(s["running"] for s in res["paged"]["kv_samples"]) > 2
    assert res["paged"]["kv"]["mean_utilisation"] > res["orca"]["kv"]["mean_utilisation"]


def test_offline_shared_prefix_with_prefix_caching(checkpoint_factory, tmp_path):
    tiny = checkpoint_factory("llama")[0]
    out = tmp_path / "prefix.json"
    argv = ["bench", "offline", "--model", tiny, "--num-requests", "4", "--dataset", "random",
            "--shared-prefix-len", "24", "--prompt-len", "8:12", "--output-len", "2:4", "--block-size", "4",
            "--backends", "paged", "--enable-prefix-caching", "--no-floor", "--output-json", str(out), "--no-progress"]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    kv = report["results"][0]["kv"]
    prompt_tokens = report["trace"]["prompt_tokens"]
    assert report["settings"]["trace"]["shared_prefix_len"] == 24
    # the three requests after the first find the shared 24 tokens (the warm-up runs its prompts
    # reversed, so it leaves none of them cached)
    assert kv["prefix_cache_hits"] == 3 * 24
    assert kv["prompt_tokens_computed"] == prompt_tokens - kv["prefix_cache_hits"]
