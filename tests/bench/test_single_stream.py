"""`bench offline --mode single`: one request at a time, time to first token and ms per token."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

from orcinus.bench import single_stream

SRC = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(single_stream.__file__))))


def test_summarize_skips_one_token_requests_for_the_per_token_time() -> None:
    s = single_stream.summarize([{"ttft_s": 0.1, "tpot_s": 0.02, "output_tokens": 5},
                                 {"ttft_s": 0.3, "tpot_s": math.nan, "output_tokens": 1},
                                 {"ttft_s": 0.2, "tpot_s": 0.04, "output_tokens": 3}])
    assert s["requests"] == 3 and abs(s["ttft_ms_mean"] - 200.0) < 1e-9 and s["ttft_ms_median"] == 200.0
    assert abs(s["tpot_ms_mean"] - 30.0) < 1e-9


def test_orcinus_single_stream_end_to_end(tmp_path) -> None:
    out = subprocess.run([sys.executable, "-m", "orcinus", "bench", "offline", "--mode", "single", "--backends",
                          "paged,hf", "--num-requests", "2", "--prompt-len", "8:16", "--output-len", "3:5",
                          "--no-progress", "--dtype", "float32", "--output-json", str(tmp_path / "r.json")],
                         env=dict(os.environ) | {"PYTHONPATH": SRC}, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "r.json").read_text())
    paged, hf = report["results"]
    assert paged["status"] == "ok" and hf["status"].startswith("n/a: --mode single")
    rows = paged["single"]["rows"]
    # each request produced what it asked for, its first token came before its last
    assert paged["output_tokens"] == report["trace"]["output_tokens"] == sum(r["output_tokens"] for r in rows)
    assert all(r["ttft_s"] > 0 and r["tpot_s"] > 0 for r in rows)
    assert "One request at a time" in out.stdout and "| paged |" in out.stdout
