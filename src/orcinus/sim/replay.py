"""Replays a timed trace into a simulated engine on its virtual clock: the same arrivals, the
same per-request timings and metrics as `bench/engine_driver.py`'s real-time replay, with the
clock jumping over idle time instead of sleeping."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Sequence

from orcinus.bench.load_generator import LoadRun
from orcinus.bench.metrics import RequestResult, compute_metrics
from orcinus.bench.workloads import BenchRequest
from orcinus.sim.clock import VirtualClock


@dataclass
class _Live:
    result: RequestResult
    index: int
    sent: float
    last: float
    tokens: int = 0


def replay_simulated(engine, clock: VirtualClock, trace: Sequence[BenchRequest],
                     slos_ms: dict[str, float] | None = None, lengths_known: bool = True,
                     id_prefix: str = "bench-") -> LoadRun:
    """Runs the trace to completion on an idle simulated engine; times are virtual seconds.
    Request i is named f"{id_prefix}{i}" (so a length oracle can find it)."""
    from orcinus.sampling_params import SamplingParams

    order = sorted(range(len(trace)), key=lambda i: trace[i].arrival_offset)
    pending = deque(order)
    live: dict[str, _Live] = {}
    results: list[RequestResult | None] = [None] * len(trace)
    start = clock.now
    while pending or live:
        if not live and pending:  # idle: jump to the next arrival
            clock.advance_to(start + trace[pending[0]].arrival_offset)
        now = clock.now
        while pending and start + trace[pending[0]].arrival_offset <= now:
            i = pending.popleft()
            req = trace[i]
            rid = f"{id_prefix}{i}"
            params = SamplingParams(temperature=0.0, max_tokens=req.output_len if lengths_known else None,
                                    ignore_eos=lengths_known)
            res = RequestResult(prompt_len=req.prompt_len, expected_output_len=req.output_len, send_time=now)
            try:
                engine.add_request(rid, {"prompt_token_ids": req.prompt_token_ids}, params, arrival_time=now)
            except Exception as exc:  # a rejected request is a failed request, as in the real replay
                res.error = f"{type(exc).__name__}: {exc}"
                results[i] = res
                continue
            live[rid] = _Live(res, i, now, now)
        if not live:
            continue
        outs = engine.step()
        t = clock.now
        for out in outs:
            st = live.get(out.request_id)
            if st is None:
                continue
            n = len(out.outputs[0].token_ids)
            if n > st.tokens:
                if st.tokens == 0:
                    st.result.ttft = t - st.sent
                else:
                    st.result.itl.append(t - st.last)
                st.result.num_chunks += 1
                st.tokens, st.last = n, t
            if out.finished:
                st.result.latency = t - st.sent
                st.result.output_len = n
                st.result.success = n > 0
                if n == 0:
                    st.result.error = "finished without a token"
                results[st.index] = st.result
                del live[out.request_id]
    duration = clock.now - start
    done = [r for r in results if r is not None]
    errors = sorted({r.error for r in done if not r.success})
    return LoadRun(done, duration, compute_metrics(done, duration, slos_ms), errors)


def trace_lengths(trace: Sequence[BenchRequest], id_prefix: str = "bench-") -> dict[str, int]:
    """The length oracle of a trace replayed with `replay_simulated`: EOS at each output length."""
    return {f"{id_prefix}{i}": r.output_len for i, r in enumerate(trace)}
