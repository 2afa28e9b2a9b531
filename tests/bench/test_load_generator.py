"""The bench serve client and load generator against a fake streaming server with known timing."""
import os
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from fake_openai_server import FAIL_MAX_TOKENS, start_fake_server  # noqa: E402

from orcinus.bench.arrivals import with_arrivals  # noqa: E402
from orcinus.bench.client import EndpointConfig  # noqa: E402
from orcinus.bench.load_generator import run_load  # noqa: E402
from orcinus.bench.workloads import BenchRequest  # noqa: E402


@pytest.fixture()
def fake():
    server, state, url = start_fake_server()
    yield state, url
    server.shutdown()
    server.server_close()


def test_streamed_timings_and_token_counts(fake):
    state, url = fake
    trace = [BenchRequest([5, 6, 7], 6), BenchRequest([8] * 10, 3), BenchRequest([1, 2], 1, prompt_text="hi there")]
    run = run_load(trace, EndpointConfig(url, model=""), progress=False)
    assert run.errors == [] and run.metrics.completed == 3
    # The model name came from /v1/models; ids went out as a token list, text as a string.
    assert {b["model"] for b in state.bodies} == {"fake-model"}
    assert sorted(map(str, (b["prompt"] for b in state.bodies))) == sorted(["[5, 6, 7]", "[8, 8, 8, 8, 8, 8, 8, 8, 8, 8]", "hi there"])
    assert all(b["stream"] and b["ignore_eos"] and b["stream_options"] == {"include_usage": True}
               and b["temperature"] == 0.0 for b in state.bodies)
    by_len = {r.expected_output_len: r for r in run.results}
    for n, r in by_len.items():
        assert r.output_len == n == r.num_chunks and len(r.itl) == n - 1
        assert r.generated_text == "".join(f"t{i} " for i in range(n))
        # Causality on one clock: the client sent before the server read the body, and saw each
        # token no earlier than the server wrote it. (No bound on durations: a loaded machine may
        # stretch any of them.)
        prompt = next(str(b["prompt"]) for b in state.bodies if b["max_tokens"] == n)
        assert r.send_time <= state.received_at[prompt]
        written = state.chunk_times[prompt]
        seen = [r.send_time + r.ttft]
        for gap in r.itl:
            seen.append(seen[-1] + gap)
        assert len(seen) == len(written) == n
        assert all(s >= w - 1e-9 for s, w in zip(seen, written)), (seen, written)
        assert r.send_time + r.latency >= written[-1]
    assert by_len[6].tpot == pytest.approx(sum(by_len[6].itl) / 5)
    m = run.metrics
    assert m.total_output_tokens == 10 and m.total_input_tokens == 3 + 10 + 2
    assert m.itl_ms.count == 5 + 2 and m.tpot_ms.count == 2  # the 1-token request has no TPOT
    assert m.output_throughput == pytest.approx(10 / m.duration_s)


def test_failures_are_reported_not_raised(fake):
    _, url = fake
    trace = [BenchRequest([1, 2, 3], FAIL_MAX_TOKENS), BenchRequest([1, 2, 3], 2)]
    run = run_load(trace, EndpointConfig(url, model="m"), progress=False)
    assert run.metrics.completed == 1 and run.metrics.failed == 1
    assert run.errors and "HTTP 500" in run.errors[0]


def test_concurrency_cap_and_fixed_rate_arrivals(fake):
    state, url = fake
    trace = [BenchRequest([1, 2], 5) for _ in range(6)]
    run = run_load(trace, EndpointConfig(url, model="m"), max_concurrency=2, progress=False)
    assert run.metrics.completed == 6 and state.max_in_flight == 2
    timed = with_arrivals([BenchRequest([1, 2], 1, prompt_text=f"p{i}") for i in range(4)], rate=10.0, mode="fixed")
    assert [r.arrival_offset for r in timed] == pytest.approx([0.0, 0.1, 0.2, 0.3])
    before = time.perf_counter()
    run = run_load(timed, EndpointConfig(url, model="m"), progress=False)
    # No request goes out before its arrival time (the run started after `before`); being late is
    # allowed, since a loaded machine may wake the sender late.
    for req, res in zip(timed, run.results):
        assert res.send_time >= before + req.arrival_offset
    assert run.metrics.duration_s >= 0.3  # the last one arrives 0.3 s in, so the run lasts at least that
