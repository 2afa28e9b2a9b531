"""Replays a timed trace straight into an in-process `LLMEngine`, in real time.

This is the sweep's `--target engine`: the same arrival schedule and the same metrics as
`bench serve`, without HTTP, JSON and detokenisation in the way. It shows what the scheduling
policy itself does to latency and throughput; `--target server` shows what a client sees.
A request is "sent" when it is added to the engine; its tokens are timed when `step()` returns.

With `lengths_known=False` a request gives no `max_tokens` and ends when it has its trace length,
as if the model had emitted EOS there (see `eos_emulation.py`): Orca must then reserve the whole
context for it.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Sequence

from tqdm.auto import tqdm

from orcinus.bench.load_generator import LoadRun
from orcinus.bench.metrics import RequestResult, compute_metrics
from orcinus.bench.workloads import BenchRequest


@dataclass
class _Live:
    result: RequestResult
    sent: float
    last: float
    tokens: int = 0


def replay_on_engine(engine, trace: Sequence[BenchRequest], slos_ms: dict[str, float] | None = None,
                     progress: bool = True, desc: str = "engine replay", lengths_known: bool = True) -> LoadRun:
    """Runs the trace to completion on `engine` (an idle `orcinus.engine.llm_engine.LLMEngine`)."""
    from orcinus.sampling_params import SamplingParams

    order = sorted(range(len(trace)), key=lambda i: trace[i].arrival_offset)
    pending = deque(order)
    live: dict[str, _Live] = {}
    results: list[RequestResult | None] = [None] * len(trace)
    index_of: dict[str, int] = {}
    bar = tqdm(total=len(trace), desc=desc, unit="req", disable=not progress, dynamic_ncols=True)
    start = time.perf_counter()
    try:
        while pending or live:
            now = time.perf_counter()
            while pending and start + trace[pending[0]].arrival_offset <= now:
                i = pending.popleft()
                req = trace[i]
                rid = f"bench-{i}"
                params = SamplingParams(temperature=0.0, max_tokens=req.output_len if lengths_known else None,
                                        ignore_eos=True)
                res = RequestResult(prompt_len=req.prompt_len, expected_output_len=req.output_len, send_time=now)
                try:
                    engine.add_request(rid, {"prompt_token_ids": req.prompt_token_ids}, params)
                except Exception as exc:  # a rejected request is a failed request, not a crash
                    res.error = f"{type(exc).__name__}: {exc}"
                    results[i] = res
                    bar.update(1)
                    continue
                live[rid] = _Live(res, now, now)
                index_of[rid] = i
            if not live:
                if pending:  # idle until the next arrival
                    time.sleep(max(0.0, start + trace[pending[0]].arrival_offset - time.perf_counter()))
                continue
            outs = engine.step()
            t = time.perf_counter()
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
                # lengths unknown: the trace length is the "EOS" the scheduler could not foresee
                ends = out.finished or (not lengths_known and n >= trace[index_of[out.request_id]].output_len)
                if ends and not out.finished:
                    engine.abort_request(out.request_id)
                if ends:
                    st.result.latency = t - st.sent
                    st.result.output_len = n
                    st.result.success = n > 0
                    if n == 0:
                        st.result.error = "finished without a token"
                    results[index_of[out.request_id]] = st.result
                    del live[out.request_id]
                    bar.update(1)
    finally:
        bar.close()
        for rid in list(live):  # an interrupted replay must not leave requests in the engine
            engine.abort_request(rid)
    duration = time.perf_counter() - start
    done = [r for r in results if r is not None]
    errors = sorted({r.error for r in done if not r.success})
    return LoadRun(done, duration, compute_metrics(done, duration, slos_ms), errors)
