"""Parsing orcinus' Prometheus exposition for the KV poller, against prometheus_client's own output."""
import asyncio
import math

import httpx
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from orcinus.bench.server_kv import MetricsSampler, parse_metrics


def _exposition(running, real, allocated, usage, preemptions, queries, hits, iterations) -> str:
    class Collector:
        def collect(self):
            yield GaugeMetricFamily("orcinus:num_requests_running", "", value=running)
            yield GaugeMetricFamily("orcinus:kv_cache_real_token_slots", "", value=real)
            yield GaugeMetricFamily("orcinus:kv_cache_allocated_slots", "", value=allocated)
            yield GaugeMetricFamily("orcinus:kv_cache_usage_perc", "", value=usage)
            yield CounterMetricFamily("orcinus:num_preemptions", "", value=preemptions)
            yield CounterMetricFamily("orcinus:prefix_cache_queries", "", value=queries)
            yield CounterMetricFamily("orcinus:prefix_cache_hits", "", value=hits)
            yield CounterMetricFamily("orcinus:iterations", "", value=iterations)
            labelled = CounterMetricFamily("orcinus:request_success", "", labels=["finished_reason"])
            labelled.add_metric(["stop"], 7)
            yield labelled

    registry = CollectorRegistry()
    registry.register(Collector())
    return generate_latest(registry).decode()


def test_parse_metrics_reads_unlabelled_samples():
    values = parse_metrics(_exposition(3, 90, 120, 0.25, 2, 400, 100, 55))
    assert values["orcinus:num_requests_running"] == 3 and values["orcinus:kv_cache_allocated_slots"] == 120
    assert values["orcinus:num_preemptions_total"] == 2 and values["orcinus:iterations_total"] == 55
    assert not any(k.startswith("orcinus:request_success") and "{" in k for k in values)


def test_sampler_summary_means_and_counter_increments():
    # three scrapes: the first is the counters' baseline
    pages = iter([_exposition(0, 0, 0, 0.0, 1, 100, 10, 5), _exposition(4, 90, 100, 0.5, 3, 300, 110, 25),
                  _exposition(2, 30, 60, 0.25, 4, 500, 210, 45)])
    transport = httpx.MockTransport(lambda request: httpx.Response(200, text=next(pages)))

    async def go():
        async with httpx.AsyncClient(transport=transport) as client:
            sampler = MetricsSampler(client, "http://x")
            for _ in range(3):
                await sampler.scrape()
            return sampler.summary()

    s = asyncio.run(go())
    assert s["samples"] == 3 and s["mean_running"] == 2.0
    assert s["mean_utilisation"] == (0.9 + 0.5) / 2  # samples with nothing allocated do not count
    assert math.isclose(s["mean_allocated_fraction"], 0.25)
    assert (s["preemptions"], s["iterations"], s["prefix_cache_hits"]) == (3, 40, 200)
    assert s["prefix_cache_hit_rate"] == 200 / 400


def test_sampler_ignores_a_server_without_orcinus_metrics():
    transport = httpx.MockTransport(lambda request: httpx.Response(200, text="vllm:num_requests_running 3\n"))

    async def go():
        async with httpx.AsyncClient(transport=transport) as client:
            sampler = MetricsSampler(client, "http://x")
            await sampler.scrape()
            return sampler.summary()

    assert asyncio.run(go()) is None
