"""The result of one `bench serve` run: settings, summary metrics, optionally every request."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from orcinus.bench.load_generator import LoadRun
from orcinus.bench.metrics import BenchmarkMetrics, Stats
from orcinus.bench.report import fmt


@dataclass
class ServeReport:
    settings: dict  # endpoint, model, dataset, rate, arrivals, concurrency, seed
    trace: dict
    machine: dict
    command: str
    metrics: BenchmarkMetrics
    errors: list[str] = field(default_factory=list)
    requests: list[dict] | None = None  # per-request details with --save-detailed
    server_kv: dict | None = None  # the server's KV use polled from /metrics (--scrape-metrics)

    @classmethod
    def from_run(cls, run: LoadRun, settings: dict, trace: dict, machine: dict, command: str,
                 detailed: bool = False) -> "ServeReport":
        requests = None
        if detailed:
            requests = []
            for r in run.results:
                d = dataclasses.asdict(r)
                d["tpot"], d["normalized_latency"] = r.tpot, r.normalized_latency
                requests.append(d)
        return cls(settings, trace, machine, command, run.metrics, run.errors, requests, run.server_kv)

    def summary(self) -> str:
        m = self.metrics
        lines = [
            "=" * 20 + " bench serve result " + "=" * 20,
            f"{'successful requests:':<42}{m.completed}",
            f"{'failed requests:':<42}{m.failed}",
            f"{'benchmark duration (s):':<42}{fmt(m.duration_s)}",
            f"{'total input tokens:':<42}{m.total_input_tokens}",
            f"{'total generated tokens:':<42}{m.total_output_tokens}",
            f"{'request throughput (req/s):':<42}{fmt(m.request_throughput, 3)}",
            f"{'output token throughput (tok/s):':<42}{fmt(m.output_throughput)}",
            f"{'total token throughput (tok/s):':<42}{fmt(m.total_token_throughput)}",
        ]
        if m.goodput is not None:
            slos = ", ".join(f"{k} <= {v:g} ms" for k, v in m.slos_ms.items())
            lines.append(f"{f'goodput (req/s, {slos}):':<42}{fmt(m.goodput, 3)}")
        for name, stats in (("TTFT", m.ttft_ms), ("TPOT", m.tpot_ms), ("ITL", m.itl_ms), ("E2E latency", m.e2el_ms),
                            ("normalized latency (ms/token)", m.normalized_latency_ms)):
            lines.append(_stats_line(name, stats))
        if self.server_kv:
            k = self.server_kv
            lines += [f"server KV use ({k['source']}, {k['samples']} samples):",
                      f"{'  mean running sequences:':<42}{fmt(k['mean_running'])}",
                      f"{'  KV utilisation (real / allocated, %):':<42}{fmt(100.0 * k['mean_utilisation'], 1)}",
                      f"{'  KV blocks in use (% of pool):':<42}{fmt(100.0 * k['mean_allocated_fraction'], 1)}",
                      f"{'  preemptions:':<42}{k['preemptions']}",
                      f"{'  prefix-cache hit rate (%):':<42}{fmt(100.0 * k['prefix_cache_hit_rate'], 1)}"]
        for e in self.errors[:5]:
            lines.append(f"error: {e}")
        lines.append("=" * 60)
        return "\n".join(lines)


def _stats_line(name: str, s: Stats) -> str:
    return (f"{name + ' (ms):' if 'ms/token' not in name else name + ':':<42}mean {fmt(s.mean)}  median {fmt(s.median)}"
            f"  p90 {fmt(s.p90)}  p99 {fmt(s.p99)}")
