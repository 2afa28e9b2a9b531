"""The paper's Figure 10 from sweep points: throughput against median normalized latency.

One line per configuration, one marker per offered request rate: x is the achieved throughput
(requests/s), y the median over requests of end-to-end latency / generated tokens (ms/token).
A good system's line stays low further to the right.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

from orcinus.bench.report import markdown_table


@dataclass
class SweepPoint:
    config: str
    rate: float  # offered requests/s (inf: all at once)
    request_throughput: float
    output_throughput: float
    median_normalized_latency_ms: float
    p90_normalized_latency_ms: float
    median_ttft_ms: float
    median_e2el_ms: float
    completed: int
    failed: int
    duration_s: float
    # engine target only: process CPU seconds, the run's KVUsageSummary and its per-iteration samples
    cpu_s: float = math.nan
    kv: dict | None = None
    kv_samples: list | None = None


def by_config(points: Sequence[SweepPoint]) -> dict[str, list[SweepPoint]]:
    groups: dict[str, list[SweepPoint]] = defaultdict(list)
    for p in points:
        groups[p.config].append(p)
    return {k: sorted(v, key=lambda p: p.rate) for k, v in groups.items()}


def plot_figure10(points: Sequence[SweepPoint], path: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    markers = "osD^v<>pP*X"
    for i, (config, pts) in enumerate(by_config(points).items()):
        pts = [p for p in pts if p.completed > 0]
        ax.plot([p.request_throughput for p in pts], [p.median_normalized_latency_ms for p in pts],
                marker=markers[i % len(markers)], label=config)
    ax.set_xlabel("throughput (requests/s)")
    ax.set_ylabel("median normalized latency (ms/token)")
    ax.set_title(title or "Throughput vs. median normalized latency (Orca Fig. 10)", fontsize=10)
    ax.set_ylim(bottom=0)
    ax.set_xlim(left=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def sweep_table(points: Sequence[SweepPoint]) -> str:
    rows = []
    for config, pts in by_config(points).items():
        for p in pts:
            rows.append([config, p.rate, p.request_throughput, p.output_throughput, p.median_normalized_latency_ms,
                         p.p90_normalized_latency_ms, p.median_ttft_ms, p.median_e2el_ms,
                         f"{p.completed}/{p.completed + p.failed}"])
    headers = ["config", "rate (req/s)", "throughput (req/s)", "output tok/s", "median norm. latency (ms/tok)",
               "p90 norm. latency (ms/tok)", "median TTFT (ms)", "median E2EL (ms)", "completed"]
    return markdown_table(headers, rows)


def memory_table(points: Sequence[SweepPoint]) -> str:
    """What the engine did with its KV memory at each point (engine target: sampled every iteration;
    server target: from the server's /metrics, polled); empty when unknown."""
    rows = []
    for config, pts in by_config(points).items():
        for p in pts:
            if p.kv:
                k = p.kv
                rows.append([config, p.rate, p.output_throughput, p.duration_s, p.cpu_s, k["mean_running"],
                             100.0 * k["mean_utilisation"], 100.0 * k["mean_allocated_fraction"], k["preemptions"],
                             100.0 * k["prefix_cache_hit_rate"], k.get("prompt_tokens_computed"),
                             k.get("tokens_computed")])
    if not rows:
        return ""
    headers = ["config", "rate (req/s)", "output tok/s", "wall s", "CPU s", "mean running seqs",
               "KV utilisation % (real / allocated)", "allocated % of pool", "preemptions", "prefix-cache hit %",
               "prompt tokens computed", "tokens computed"]
    return markdown_table(headers, rows)
