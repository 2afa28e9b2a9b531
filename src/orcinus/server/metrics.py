"""Prometheus metrics, named as vLLM names them (with the `orcinus:` prefix) so dashboards carry over.

Engine-wide numbers (queue lengths, KV usage, token totals) are read from the AsyncEngine's
snapshot at scrape time by a collector, so nothing has to keep them in sync. Per-request
latencies are observed by the server as each request ends. Every app gets its own registry:
two apps in one process (tests) must not collide in prometheus-client's global one.
"""
from __future__ import annotations

from typing import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from orcinus.engine.async_engine import AsyncEngine
from orcinus.request import RequestOutput

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0, 160.0, 640.0)
_TPOT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
                 5.0, 10.0)


class _EngineCollector(Collector):
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        s = self.engine.stats()
        yield GaugeMetricFamily("orcinus:num_requests_running",
                                "Sequences admitted to the engine (they hold KV space).", value=s.num_running)
        yield GaugeMetricFamily("orcinus:num_requests_waiting", "Sequences waiting to be admitted.",
                                value=self.engine.num_waiting())
        yield GaugeMetricFamily("orcinus:kv_cache_usage_perc", "Fraction of KV cache blocks in use (1 = all).",
                                value=s.kv_cache_usage)
        yield GaugeMetricFamily("orcinus:kv_cache_free_blocks", "KV cache blocks free.", value=s.num_free_blocks)
        yield GaugeMetricFamily("orcinus:kv_cache_total_blocks", "KV cache blocks in all.", value=s.num_blocks)
        yield GaugeMetricFamily("orcinus:engine_healthy", "1 while the engine loop is alive and making progress.",
                                value=1.0 if self.engine.health().ok else 0.0)
        yield GaugeMetricFamily("orcinus:stream_buffered_outputs",
                                "Outputs produced but not yet taken by their (HTTP) consumers; at most one per "
                                "request in flight, however slowly clients read.",
                                value=self.engine.num_buffered_outputs())
        yield CounterMetricFamily("orcinus:prompt_tokens", "Prompt tokens processed.", value=s.prompt_tokens_total)
        yield CounterMetricFamily("orcinus:generation_tokens", "Tokens generated.", value=s.generation_tokens_total)
        yield CounterMetricFamily("orcinus:iterations", "Engine iterations run.", value=s.iterations_total)
        yield CounterMetricFamily("orcinus:num_preemptions", "Requests preempted (KV blocks taken back, recomputed "
                                  "later).", value=s.num_preemptions_total)
        yield CounterMetricFamily("orcinus:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                                  value=s.prefix_cache_queries_total)
        yield CounterMetricFamily("orcinus:prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                                  value=s.prefix_cache_hits_total)
        yield GaugeMetricFamily("orcinus:kv_cache_real_token_slots", "KV slots holding a computed token.",
                                value=s.kv_real_token_slots)
        yield GaugeMetricFamily("orcinus:kv_cache_allocated_slots", "KV slots in blocks held by requests "
                                "(reserved or filled).", value=s.kv_allocated_slots)


class ServerMetrics:
    def __init__(self, engine: AsyncEngine, model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(engine))
        labels = {"model_name": model_name}

        def histogram(name: str, doc: str, buckets: tuple[float, ...]):
            return Histogram(name, doc, labelnames=list(labels), buckets=buckets,
                             registry=self.registry).labels(**labels)

        self.ttft = histogram("orcinus:time_to_first_token_seconds", "Time from arrival to the first token.",
                              _LATENCY_BUCKETS)
        self.tpot = histogram("orcinus:time_per_output_token_seconds",
                              "Mean time between output tokens of a request.", _TPOT_BUCKETS)
        self.e2e = histogram("orcinus:e2e_request_latency_seconds", "Time from arrival to the last token.",
                             _LATENCY_BUCKETS)
        self._finished = Counter("orcinus:request_success", "Requests (sequences) ended, by why they ended.",
                                 labelnames=["model_name", "finished_reason"], registry=self.registry)
        self._model = model_name
        self.stalled_streams = Counter("orcinus:stalled_streams_aborted",
                                       "Streams aborted because their client accepted no data for too long.",
                                       registry=self.registry)

    def observe_finished(self, out: RequestOutput) -> None:
        """A request group finished in the engine: record its latencies and how each sequence ended."""
        m = out.metrics
        if m is not None and m.first_token_time is not None:
            self.ttft.observe(max(0.0, m.first_token_time - m.arrival_time))
            if m.finished_time is not None:
                self.e2e.observe(max(0.0, m.finished_time - m.arrival_time))
                tokens = max((len(c.token_ids) for c in out.outputs), default=0)
                if tokens > 1:
                    self.tpot.observe(max(0.0, m.finished_time - m.first_token_time) / (tokens - 1))
        for c in out.outputs:
            self._finished.labels(self._model, c.finish_reason or "abort").inc()

    def observe_aborted(self, num_sequences: int) -> None:
        """Sequences aborted before they finished (client gone, shutdown, engine failure)."""
        self._finished.labels(self._model, "abort").inc(num_sequences)

    def render(self) -> bytes:
        return generate_latest(self.registry)
