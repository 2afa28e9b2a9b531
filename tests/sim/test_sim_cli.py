"""End to end through the CLI: `bench offline --simulate`, `bench sweep --simulate`, `bench simulate`
(a scaled-down Figure 10), `bench calibrate`'s stored file read back by `--simulate this-machine`."""
from __future__ import annotations

import json
import math

import pytest

from orcinus.cli import main


def test_bench_offline_simulated_writes_the_real_report_shape(tmp_path) -> None:
    out = tmp_path / "off.json"
    rc = main(["bench", "offline", "--simulate", "a100-40gb", "--model", "gpt3-175b", "--tensor-parallel-size", "8",
               "--pipeline-parallel-size", "2", "--backends", "orca,static,hf", "--dataset", "orca",
               "--num-requests", "40", "--output-json", str(out), "--no-progress"])
    assert rc == 0
    report = json.loads(out.read_text())
    res = {r["backend"]: r for r in report["results"]}
    assert res["orca"]["status"] == "ok" and res["orca"]["elapsed_s"] > 0
    assert res["orca"]["output_tokens"] == report["trace"]["output_tokens"]
    assert res["hf"]["status"].startswith("n/a")
    # two pipeline stages: orca keeps two batches in flight, static one; the same trace, less time
    assert res["orca"]["elapsed_s"] < res["static"]["elapsed_s"]
    assert report["settings"]["simulated"].startswith("gpt3-175b on 16 x a100-40gb")


def test_bench_sweep_simulated(tmp_path) -> None:
    rc = main(["bench", "sweep", "--simulate", "h100", "--model", "llama-3-8b", "--configs", "orca:8", "paged-chunked",
               "--rates", "2,inf", "--num-requests", "30", "--output-dir", str(tmp_path), "--no-progress"])
    assert rc == 0
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    assert sweep["simulate"] == "h100" and len(sweep["points"]) == 4
    assert all(p["completed"] == 30 for p in sweep["points"])
    assert (tmp_path / "figure10.png").is_file()


def test_scaled_down_figure10(tmp_path) -> None:
    """Two Table 1 models, every system, five rates: runs in seconds."""
    rc = main(["bench", "simulate", "--models", "gpt3-13b,gpt3-175b", "--num-requests", "60", "--no-modern",
               "--output-dir", str(tmp_path)])
    assert rc == 0
    data = json.loads((tmp_path / "simulate.json").read_text())
    by_name = {s["name"]: s for s in data["studies"]}
    for name in ("gpt3-13b", "gpt3-175b"):
        c = by_name[name]["comparison"]
        assert c["orca_over_ft"] > 1.0, c  # iteration-level scheduling beats request-level at equal latency
    assert (tmp_path / "figure10_simulated.png").is_file()
    assert "orca / FT (paper)" in (tmp_path / "simulate.md").read_text()


def test_unknown_hardware_is_one_error_line(capsys) -> None:
    rc = main(["bench", "offline", "--simulate", "tpu-v9", "--model", "gpt3-13b", "--backends", "orca",
               "--num-requests", "2", "--no-progress"])
    assert rc != 0
    assert "unknown hardware 'tpu-v9'" in capsys.readouterr().err


def test_this_machine_without_a_calibration_says_what_to_run(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("ORCINUS_CACHE", str(tmp_path))
    rc = main(["bench", "offline", "--simulate", "this-machine", "--model", "gpt3-13b", "--backends", "orca",
               "--num-requests", "2", "--no-progress"])
    assert rc != 0
    assert "orcinus bench calibrate" in capsys.readouterr().err


@pytest.mark.slow
def test_quick_calibration_is_stored_and_used(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("ORCINUS_CACHE", str(tmp_path))
    assert main(["bench", "calibrate", "--quick"]) == 0
    stored = json.loads((tmp_path / "sim" / "this-machine.json").read_text())
    assert stored["name"] == "this-machine" and all(0 < v <= 10 for v in stored["efficiency"].values())
    out = tmp_path / "off.json"
    assert main(["bench", "offline", "--simulate", "this-machine", "--backends", "orca", "--num-requests", "4",
                 "--output-len", "4", "--prompt-len", "16:32", "--no-floor", "--output-json", str(out),
                 "--no-progress"]) == 0
    res = json.loads(out.read_text())["results"][0]
    assert res["status"] == "ok" and math.isfinite(res["elapsed_s"]) and res["elapsed_s"] > 0
