"""KV memory of a live orcinus server during a load run, polled from its Prometheus `/metrics`.

In-process runs read the engine after every iteration (`kv_usage.py`); over HTTP a client can only
poll. The sampler fetches `/metrics` every `interval` seconds while the load runs and keeps the
gauges (running sequences, KV slots holding a token, KV slots held by requests, share of the pool
in use) and the counters (preemptions, prefix-cache queries and hits, iterations) at the first
and the last scrape. A server without orcinus' metrics (another engine) gives no samples, and the
run then simply has no KV summary.
"""
from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field

import httpx

from orcinus.bench.kv_usage import KVSample, sample_means

RUNNING = "orcinus:num_requests_running"
REAL = "orcinus:kv_cache_real_token_slots"
ALLOCATED = "orcinus:kv_cache_allocated_slots"
USAGE = "orcinus:kv_cache_usage_perc"
PREEMPTIONS = "orcinus:num_preemptions_total"
QUERIES = "orcinus:prefix_cache_queries_total"
HITS = "orcinus:prefix_cache_hits_total"
ITERATIONS = "orcinus:iterations_total"


def parse_metrics(text: str) -> dict[str, float]:
    """The unlabelled samples of a Prometheus text exposition, by name."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 2 or line.startswith("#") or "{" in parts[0]:
            continue
        try:
            values[parts[0]] = float(parts[1])
        except ValueError:
            continue
    return values


@dataclass
class MetricsSampler:
    client: httpx.AsyncClient
    base_url: str
    headers: dict[str, str] = field(default_factory=dict)
    interval_s: float = 0.5
    samples: list[KVSample] = field(default_factory=list)
    usage: list[float] = field(default_factory=list)  # share of the pool's blocks in use, per sample
    first: dict[str, float] | None = None
    last: dict[str, float] | None = None

    def __post_init__(self) -> None:
        self._t0 = time.perf_counter()
        self._stop = asyncio.Event()

    async def scrape(self) -> None:
        try:
            resp = await self.client.get(self.base_url.rstrip("/") + "/metrics", headers=self.headers)
        except httpx.HTTPError:
            return  # a missed sample is not worth failing the run for
        if resp.status_code != 200:
            return
        values = parse_metrics(resp.text)
        if not all(k in values for k in (RUNNING, REAL, ALLOCATED)):
            return  # not an orcinus server
        self.first = self.first or values
        self.last = values
        self.samples.append(KVSample(time.perf_counter() - self._t0, int(values[RUNNING]), int(values[REAL]),
                                     int(values[ALLOCATED])))
        self.usage.append(values.get(USAGE, math.nan))

    async def run(self) -> None:
        """Scrape until `stop()`; the first scrape is the baseline of the counters."""
        self._t0 = time.perf_counter()
        while not self._stop.is_set():
            await self.scrape()
            try:
                await asyncio.wait_for(self._stop.wait(), self.interval_s)
            except asyncio.TimeoutError:
                pass
        await self.scrape()  # the counters at the end

    def stop(self) -> None:
        self._stop.set()

    def summary(self) -> dict | None:
        """Means over the samples and counter increments over the run, in KVUsageSummary's names."""
        if not self.samples or self.first is None or self.last is None:
            return None
        usage = [u for u in self.usage if not math.isnan(u)]
        delta = lambda name: int(self.last.get(name, 0.0) - self.first.get(name, 0.0))
        queries = delta(QUERIES)
        mean_running, mean_utilisation = sample_means(self.samples)
        return {
            "source": f"server /metrics every {self.interval_s:g} s",
            "samples": len(self.samples),
            "iterations": delta(ITERATIONS),
            "mean_running": mean_running,
            "mean_utilisation": mean_utilisation,
            "mean_allocated_fraction": sum(usage) / len(usage) if usage else math.nan,
            "preemptions": delta(PREEMPTIONS),
            "prefix_cache_hits": delta(HITS),
            "prefix_cache_hit_rate": delta(HITS) / queries if queries else 0.0,
        }
