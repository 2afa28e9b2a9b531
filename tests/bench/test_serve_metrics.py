"""Metric computations on synthetic timestamps with known answers."""
import math

import pytest

from orcinus.bench.metrics import RequestResult, Stats, compute_metrics, meets_slos, parse_slos


def _result(ttft, itl, output_len, prompt_len=10, success=True):
    latency = ttft + sum(itl)
    return RequestResult(prompt_len=prompt_len, output_len=output_len, expected_output_len=output_len,
                         success=success, ttft=ttft, latency=latency, itl=list(itl), num_chunks=len(itl) + 1)


def test_stats_percentiles_interpolate_linearly():
    s = Stats.of([1.0, 2.0, 3.0, 4.0])
    assert (s.mean, s.median, s.count) == (2.5, 2.5, 4)
    assert s.p90 == pytest.approx(3.7) and s.p99 == pytest.approx(3.97)
    assert Stats.of([]).count == 0


def test_per_request_tpot_and_normalized_latency():
    r = _result(ttft=0.5, itl=[0.1] * 9, output_len=10)  # 10 tokens: first at 0.5 s, then every 0.1 s
    assert r.latency == pytest.approx(1.4)
    assert r.tpot == pytest.approx(0.1)
    assert r.normalized_latency == pytest.approx(0.14)
    one = _result(ttft=0.3, itl=[], output_len=1)
    assert one.tpot is None and one.normalized_latency == pytest.approx(0.3)


def test_summary_metrics_known_answers():
    results = [
        _result(0.1, [0.1] * 9, 10, prompt_len=100),   # e2el 1.0, tpot 0.1, norm 0.1
        _result(0.2, [0.2] * 4, 5, prompt_len=50),     # e2el 1.0, tpot 0.2, norm 0.2
        _result(0.3, [0.05] * 2, 3, prompt_len=20),    # e2el 0.4, tpot 0.05, norm 0.4/3
        _result(0.0, [], 0, success=False),            # a failure counts only as failed
    ]
    m = compute_metrics(results, duration_s=2.0)
    assert (m.completed, m.failed) == (3, 1)
    assert m.total_input_tokens == 170 and m.total_output_tokens == 18
    assert m.request_throughput == pytest.approx(1.5)
    assert m.output_throughput == pytest.approx(9.0)
    assert m.total_token_throughput == pytest.approx(94.0)
    assert m.ttft_ms.mean == pytest.approx(200.0) and m.ttft_ms.median == pytest.approx(200.0)
    assert m.tpot_ms.median == pytest.approx(100.0)
    assert m.e2el_ms.mean == pytest.approx(800.0)
    assert m.itl_ms.count == 15
    assert m.itl_ms.mean == pytest.approx(1000.0 * (0.9 + 0.8 + 0.1) / 15)
    assert m.normalized_latency_ms.median == pytest.approx(400.0 / 3)
    assert m.goodput is None


def test_goodput_counts_requests_meeting_every_slo():
    results = [_result(0.1, [0.1] * 9, 10), _result(0.2, [0.2] * 4, 5), _result(0.3, [0.05] * 2, 3)]
    m = compute_metrics(results, 2.0, parse_slos(["ttft:250", "tpot:150"]))
    assert m.goodput == pytest.approx(1 / 2.0)  # the second misses TPOT (200 ms), the third TTFT (300 ms)
    m = compute_metrics(results, 2.0, parse_slos(["ttft:250", "tpot:250"]))
    assert m.goodput == pytest.approx(2 / 2.0)  # now only the third misses (TTFT)
    m = compute_metrics(results, 2.0, parse_slos(["normalized_latency:150"]))
    assert m.goodput == pytest.approx(2 / 2.0)  # 100 and 133 ms/token pass, 200 fails
    assert meets_slos(_result(0.1, [], 1), {"tpot": 1.0})  # one token: no TPOT to violate


def test_parse_slos_rejects_nonsense():
    assert parse_slos(["ttft:500,e2el:2000"]) == {"ttft": 500.0, "e2el": 2000.0}
    for bad in (["ttft"], ["foo:3"], ["ttft:-1"]):
        with pytest.raises(ValueError):
            parse_slos(bad)
    assert parse_slos(None) == {}


def test_zero_duration_does_not_divide_by_zero():
    m = compute_metrics([], 0.0)
    assert m.completed == 0 and math.isnan(m.request_throughput)
