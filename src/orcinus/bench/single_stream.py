"""`bench offline --mode single`: one request at a time, as one user at a terminal sees it.

Each request of the trace runs alone (the next starts when the last has finished): the time to its
first token (TTFT: the prompt's prefill and one sampling step) and the mean time between its later
tokens (TPOT, ms per output token: the decode speed of a batch of one). orcinus is timed through
the engine's own step loop in this process; the peers time the same in theirs (peer_worker_*.py),
so the rows compare like with like.
"""
from __future__ import annotations

import dataclasses
import math
import statistics
import time
from typing import Sequence

from orcinus.bench.report import markdown_table
from orcinus.bench.workloads import BenchRequest
from orcinus.config import EngineConfig

MODES = ("batch", "single")


@dataclasses.dataclass
class StreamTiming:
    ttft_s: float
    tpot_s: float  # mean seconds between output tokens after the first (nan for one token)
    output_tokens: int


def summarize(rows: Sequence[dict | StreamTiming]) -> dict:
    """Means and medians in milliseconds over the requests (TPOT over those with 2+ tokens)."""
    rows = [r if isinstance(r, StreamTiming) else StreamTiming(**r) for r in rows]
    ttft = [1000 * r.ttft_s for r in rows]
    tpot = [1000 * r.tpot_s for r in rows if r.output_tokens > 1 and not math.isnan(r.tpot_s)]
    return {"requests": len(rows),
            "ttft_ms_mean": statistics.fmean(ttft) if ttft else math.nan,
            "ttft_ms_median": statistics.median(ttft) if ttft else math.nan,
            "tpot_ms_mean": statistics.fmean(tpot) if tpot else math.nan,
            "tpot_ms_median": statistics.median(tpot) if tpot else math.nan}


def single_stream_table(results: Sequence) -> str:
    """The latency table of the backends that ran single-stream (BackendResult.single set)."""
    rows = [[r.backend, s["requests"], s["ttft_ms_mean"], s["ttft_ms_median"], s["tpot_ms_mean"], s["tpot_ms_median"],
             1000.0 / s["tpot_ms_mean"] if s["tpot_ms_mean"] > 0 else math.nan]
            for r in results if r.ok and (s := r.single)]
    if not rows:
        return ""
    return markdown_table(["backend", "requests (one at a time)", "TTFT ms mean", "TTFT ms median",
                           "ms/output token mean", "ms/output token median", "decode tok/s (1/mean)"], rows)


def _one(engine, rid: str, ids: list[int], n: int) -> StreamTiming:
    from orcinus.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    t0 = time.perf_counter()
    engine.add_request(rid, {"prompt_token_ids": ids}, params)
    first = last = None
    got = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            count = len(out.outputs[0].token_ids)
            if count > got:
                now = time.perf_counter()
                got, last = count, now
                first = now if first is None else first
    if first is None:
        raise RuntimeError(f"request {rid} produced no token")
    return StreamTiming(first - t0, (last - first) / (got - 1) if got > 1 else math.nan, got)


def run_orcinus_single(config: EngineConfig, backend: str, trace: Sequence[BenchRequest], warmup: int = 4) -> dict:
    """The trace one request at a time through an orcinus engine: the fields of
    offline.BackendResult, `single` among them."""
    from orcinus.engine.llm import LLM

    res: dict = {"status": "ok"}
    policy = backend.removesuffix("-chunked")
    kwargs = dataclasses.asdict(dataclasses.replace(config, scheduler_policy=policy, skip_tokenizer_init=True))
    t0 = time.perf_counter()
    llm = LLM(**kwargs)
    res["load_s"] = time.perf_counter() - t0
    engine = llm.engine
    try:
        for i, r in enumerate(trace[:warmup]):
            _one(engine, f"warm-{i}", r.prompt_token_ids[:16], 4)
        c0, t0 = time.process_time(), time.perf_counter()
        rows = [_one(engine, f"single-{i}", r.prompt_token_ids, r.output_len) for i, r in enumerate(trace)]
        res["elapsed_s"], res["cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
        res["output_tokens"] = sum(t.output_tokens for t in rows)
        wrong = [(t.output_tokens, r.output_len) for t, r in zip(rows, trace) if t.output_tokens != r.output_len]
        if wrong:
            res["status"] = f"error: generated/asked token counts differ, e.g. {wrong[:3]}"
        res["single"] = summarize(rows) | {"rows": [dataclasses.asdict(t) for t in rows]}
    finally:
        engine.shutdown()
    return res
