"""`bench validate-sim`: measured `bench offline` / `bench sweep` reports of a tiny random-weight
checkpoint run again on the simulated executor; the table has one row per orcinus backend (or
config and rate) and metric, and its error arithmetic is (predicted - measured) / measured."""
from __future__ import annotations

import json
import math

import pytest

from orcinus.bench.sim_validate import METRICS, Comparison, Validation, measured_argv, simulated_argv
from orcinus.cli import main


@pytest.fixture(scope="module")
def tiny(checkpoint_factory):
    return checkpoint_factory("llama")[0]


@pytest.fixture(scope="module")
def reports(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("measured")
    offline = out / "offline.json"
    assert main(["bench", "offline", "--model", tiny, "--backends", "orca,static,hf", "--num-requests", "4",
                 "--prompt-len", "4:8", "--output-len", "2:5", "--max-num-seqs", "2", "--no-floor", "--seed", "3",
                 "--output-json", str(offline), "--no-progress"]) == 0
    sweep = out / "sweep"
    assert main(["bench", "sweep", "--target", "engine", "--model", tiny, "--configs", "orca:4", "--rates", "50,inf",
                 "--num-requests", "4", "--prompt-len", "4:8", "--output-len", "2:4", "--output-dir", str(sweep),
                 "--no-progress"]) == 0
    return offline, sweep / "sweep.json"


def test_reports_record_the_arguments_to_run_them_again(reports) -> None:
    offline, sweep = (json.loads(p.read_text()) for p in reports)
    argv = measured_argv(offline)
    assert argv[:2] == ["bench", "offline"] and "--seed" in argv and "3" in argv
    assert measured_argv(sweep)[:2] == ["bench", "sweep"]
    # offline reports now carry the normalized latency of each orcinus backend
    orca = next(r for r in offline["results"] if r["backend"] == "orca")
    assert 0 < orca["median_normalized_latency_ms"] <= orca["p90_normalized_latency_ms"]


def test_simulated_argv_swaps_the_outputs_and_adds_simulate() -> None:
    argv = simulated_argv(["bench", "offline", "--output-json", "a.json", "--kv-plot=k.png", "--profile",
                           "--num-requests", "4"], "xeon-2core", "/tmp/x")
    assert argv == ["bench", "offline", "--num-requests", "4", "--simulate", "xeon-2core", "--no-progress",
                    "--no-floor", "--output-json", "/tmp/x/simulated.json"]
    with pytest.raises(ValueError, match="simulated"):
        simulated_argv(["bench", "sweep", "--simulate", "h100"], "h100", "/tmp/x")
    # a report from before rerun_argv: its command line
    assert measured_argv({"command": "orcinus bench sweep --rates 1"}) == ["bench", "sweep", "--rates", "1"]


def test_validate_sim_prints_the_table(reports, tmp_path, capsys) -> None:
    offline, sweep = reports
    out_json, out_md = tmp_path / "v.json", tmp_path / "v.md"
    rc = main(["bench", "validate-sim", str(offline), str(sweep), "--simulate", "xeon-2core",
               "--output-json", str(out_json), "--markdown", str(out_md)])
    assert rc == 0
    printed = capsys.readouterr().out
    data = json.loads(out_json.read_text())
    rows = data["comparisons"]
    # offline: orca and static (hf is not simulated: a note); sweep: one config at two rates
    configs = [r["config"] for r in rows]
    assert configs.count("orca") == configs.count("static") == len(METRICS)
    assert configs.count("orca max_num_seqs=4 @ 50 req/s") == configs.count("orca max_num_seqs=4 @ inf req/s") == len(METRICS)
    assert len(rows) == 4 * len(METRICS)
    assert any("hf not compared" in n for n in data["notes"]) and any("load average" in n for n in data["notes"])
    for r in rows:
        assert r["error"] == pytest.approx((r["predicted"] - r["measured"]) / r["measured"])
        assert r["within"] == (abs(r["error"]) <= 0.10)
    measured_offline = json.loads(offline.read_text())
    orca = next(r for r in measured_offline["results"] if r["backend"] == "orca")
    tok_s = next(r for r in rows if r["config"] == "orca" and r["metric"] == "output tok/s")
    assert tok_s["measured"] == pytest.approx(orca["output_tokens"] / orca["elapsed_s"])
    assert f"{data['within']} of {len(rows)} comparisons within 10 %" in printed
    assert "| run | backend / config | metric |" in out_md.read_text()


def test_error_and_summary_arithmetic() -> None:
    rows = [Comparison("r", "orca", "output tok/s", 100.0, 109.0), Comparison("r", "orca", "req/s", 2.0, 1.7),
            Comparison("r", "orca", METRICS[2], 50.0, 55.0), Comparison("r", "orca", METRICS[3], math.nan, 3.0)]
    assert [round(c.error, 6) for c in rows[:3]] == [0.09, -0.15, 0.1] and math.isnan(rows[3].error)
    v = Validation("hw", 0.10, rows, [])
    assert v.within_count == 2 and "2 of 4 comparisons within 10 %" in v.to_markdown()
    assert "+9.0" in v.to_markdown() and "-15.0" in v.to_markdown()


def test_single_stream_reports_are_left_out_with_a_note(tmp_path) -> None:
    from orcinus.bench.sim_validate import validate

    path = tmp_path / "single.json"
    path.write_text(json.dumps({"settings": {"mode": "single", "trace": {"num_requests": 2}},
                                "command": "orcinus bench offline --mode single", "results": []}))
    v = validate([str(path)], "xeon-2core")
    assert v.comparisons == [] and "--mode single" in v.notes[0]
