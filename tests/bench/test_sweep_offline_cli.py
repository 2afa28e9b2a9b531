"""`bench sweep` and `bench offline` end to end on a tiny random-weight checkpoint, plus their parts."""
import json

import pytest

from orcinus.bench.figure import SweepPoint, plot_figure10, sweep_table
from orcinus.bench.sweep import apply_flags, engine_flags, parse_config
from orcinus.cli import add_engine_args, main
from orcinus.config import EngineConfig


def test_parse_config_specs():
    c = parse_config("orca:16")
    assert c.engine_args == ["--scheduler-policy", "orca", "--max-num-seqs", "16"] and "16" in c.label
    c = parse_config("big batch=--max-num-seqs 64 --block-size 32")
    assert c.label == "big batch" and c.engine_args == ["--max-num-seqs", "64", "--block-size", "32"]
    with pytest.raises(ValueError):
        parse_config("orca16")
    # bench offline's backend names: no budget, or the chunked budget
    assert parse_config("orca").engine_args == ["--scheduler-policy", "orca", "--max-num-batched-tokens", "2048"]
    assert parse_config("paged", None, 8192).engine_args[-1] == "8192"  # finite: what bench/budgets.py gives
    assert parse_config("paged-chunked").engine_args[-1] == "512"
    assert parse_config("paged-chunked", 64).engine_args == ["--scheduler-policy", "paged",
                                                             "--max-num-batched-tokens", "64"]


def test_engine_flags_round_trip():
    base = EngineConfig(dtype="float32", max_num_seqs=8, skip_tokenizer_init=True, kv_cache_memory=1 << 20)
    flags = engine_flags(base)
    assert flags == ["--dtype", "float32", "--max-num-seqs", "8", "--kv-cache-memory", str(1 << 20),
                     "--skip-tokenizer-init"]
    assert apply_flags(EngineConfig(), flags, add_engine_args) == base
    over = apply_flags(base, ["--scheduler-policy", "static", "--max-num-seqs", "2"], add_engine_args)
    assert (over.scheduler_policy, over.max_num_seqs, over.dtype) == ("static", 2, "float32")


def test_figure_and_table(tmp_path):
    pts = [SweepPoint(cfg, rate, rate * k, 10 * rate, 50 / k + rate, 60, 5, 100, 8, 0, 4.0)
           for cfg, k in (("orca 8", 1.0), ("static 1", 0.5)) for rate in (0.5, 1.0, 2.0)]
    png = tmp_path / "fig.png"
    plot_figure10(pts, str(png), "test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = sweep_table(pts)
    assert table.count("\n") == 2 + 6 - 1 and "median norm. latency" in table


@pytest.fixture(scope="module")
def tiny(checkpoint_factory):
    return checkpoint_factory("llama")[0]


def test_sweep_engine_target_end_to_end(tiny, tmp_path):
    out = tmp_path / "sweep"
    argv = ["bench", "sweep", "--target", "engine", "--model", tiny, "--configs", "orca:4", "static:1",
            "--rates", "40,inf", "--num-requests", "4", "--prompt-len", "4:8", "--output-len", "2:4",
            "--output-dir", str(out), "--no-progress"]
    assert main(argv) == 0
    assert (out / "figure10.png").stat().st_size > 1000
    data = json.loads((out / "sweep.json").read_text())
    assert len(data["points"]) == 4 and all(p["completed"] == 4 and p["failed"] == 0 for p in data["points"])
    assert all(p["median_normalized_latency_ms"] > 0 for p in data["points"])
    assert "figure10.png" in (out / "sweep.md").read_text()


@pytest.mark.slow
def test_offline_all_backends_end_to_end(tiny, tmp_path, capsys):
    out = tmp_path / "offline.json"
    argv = ["bench", "offline", "--model", tiny, "--num-requests", "4", "--prompt-len", "4:8", "--output-len", "2:6",
            "--max-num-seqs", "2", "--backends", "orca,static,hf,hf-cb", "--output-json", str(out), "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "× best baseline" in printed and "orca / hf" in printed
    report = json.loads(out.read_text())
    expected = report["trace"]["output_tokens"]
    statuses = {r["backend"]: r["status"] for r in report["results"]}
    assert statuses["orca"] == statuses["static"] == statuses["hf"] == "ok"
    assert statuses["hf-cb"] == "ok", statuses  # the declared transformers has continuous batching
    for r in report["results"]:
        if r["status"] == "ok":
            assert r["output_tokens"] == expected and r["elapsed_s"] > 0
    assert report["floor"]["seconds"] > 0 and report["floor"]["output_tokens"] == expected
    assert set(report["ratios"]) == {"orca/hf", "orca/static"} and "target" not in printed
    assert report["notes"] and "too short to compare" in report["notes"][0]  # a 4-request run is
    assert "warning: timed runs shorter than" in printed
    assert report["machine"]["date"] and report["command"]
