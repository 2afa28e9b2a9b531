"""The load generator behind `orcinus bench serve`: sends a trace on its arrival schedule.

Each request is sent at its arrival offset (or later, when a concurrency cap makes it wait for
a free slot, as a closed-loop client would) and streamed on its own task, so a slow request never
delays the sending of the next one: the offered load is the trace's, not the server's pace.
"""
from __future__ import annotations

import asyncio
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Sequence

import httpx
from tqdm.auto import tqdm

from orcinus.bench.client import EndpointConfig, discover_model, send_request
from orcinus.bench.metrics import BenchmarkMetrics, RequestResult, compute_metrics
from orcinus.bench.server_kv import MetricsSampler
from orcinus.bench.workloads import BenchRequest


@dataclass
class LoadRun:
    results: list[RequestResult]
    duration_s: float
    metrics: BenchmarkMetrics
    errors: list[str] = field(default_factory=list)  # distinct error messages, for the report
    # with metrics_interval_s, against an orcinus server: its KV use polled from /metrics
    server_kv: dict | None = None
    server_kv_samples: list | None = None


async def run_load_async(trace: Sequence[BenchRequest], ep: EndpointConfig, max_concurrency: int | None = None,
                         slos_ms: dict[str, float] | None = None, progress: bool = True,
                         desc: str = "bench serve", metrics_interval_s: float | None = None) -> LoadRun:
    if max_concurrency is not None and max_concurrency < 1:
        raise ValueError("max_concurrency must be at least 1")
    n_conn = min(len(trace), max_concurrency or len(trace)) or 1
    # httpx caps a pool at 100 connections by default, which would silently cap concurrency;
    # one more for the metrics poller, which must not wait for a stream to end
    limits = httpx.Limits(max_connections=n_conn + 1, max_keepalive_connections=n_conn + 1)
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    bar = tqdm(total=len(trace), desc=desc, unit="req", disable=not progress, dynamic_ncols=True)
    async with httpx.AsyncClient(limits=limits, timeout=ep.timeout_s) as client:
        if not ep.model:
            ep.model = await discover_model(client, ep.base_url, ep.headers())
        sampler = poll = None
        if metrics_interval_s:
            sampler = MetricsSampler(client, ep.base_url, ep.headers(), metrics_interval_s)
            poll = asyncio.create_task(sampler.run())
        start = time.perf_counter()

        async def one(req: BenchRequest) -> RequestResult:
            delay = start + req.arrival_offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if sem is None:
                res = await send_request(client, req, ep)
            else:
                async with sem:
                    res = await send_request(client, req, ep)
            bar.update(1)
            return res

        try:
            results = list(await asyncio.gather(*(one(r) for r in trace)))
        finally:
            bar.close()
            duration = time.perf_counter() - start
            if sampler is not None:
                sampler.stop()
                await poll
    errors = sorted({r.error for r in results if not r.success})
    run = LoadRun(results, duration, compute_metrics(results, duration, slos_ms), errors)
    if sampler is not None and (summary := sampler.summary()) is not None:
        run.server_kv = summary
        run.server_kv_samples = [dataclasses.asdict(x) for x in sampler.samples]
    return run


def run_load(trace: Sequence[BenchRequest], ep: EndpointConfig, max_concurrency: int | None = None,
             slos_ms: dict[str, float] | None = None, progress: bool = True, desc: str = "bench serve",
             metrics_interval_s: float | None = None) -> LoadRun:
    return asyncio.run(run_load_async(trace, ep, max_concurrency, slos_ms, progress, desc, metrics_interval_s))
