"""Per-request timings and the summary metrics of a serving benchmark.

Names and definitions follow vLLM's `bench serve`, so numbers can be compared with it:
- TTFT: request sent -> first streamed token.
- TPOT: per request, (E2EL - TTFT) / (output tokens - 1): the mean gap after the first token.
- ITL: every gap between consecutive streamed chunks, pooled over all requests.
- E2EL: request sent -> last byte of the response.
plus the Orca paper's *normalized latency*: per request, E2EL / generated tokens (ms/token).
Goodput counts the requests per second that met every given SLO.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np

PERCENTILES: tuple[int, ...] = (50, 90, 99)
SLO_METRICS: tuple[str, ...] = ("ttft", "tpot", "e2el", "normalized_latency")


@dataclass
class RequestResult:
    """What the client saw of one request; times are seconds."""

    prompt_len: int
    output_len: int = 0  # generated tokens, as the server counted them (usage) when it said
    expected_output_len: int = 0  # what was asked for (max_tokens)
    success: bool = False
    error: str = ""
    send_time: float = 0.0  # monotonic clock, for ordering and the benchmark's duration
    ttft: float = 0.0
    latency: float = 0.0  # E2EL
    itl: list[float] = field(default_factory=list)  # gaps between streamed chunks after the first
    num_chunks: int = 0  # streamed chunks that carried a choice
    generated_text: str = ""

    @property
    def tpot(self) -> float | None:
        if self.output_len <= 1:
            return None  # one token has no "per output token after the first"
        return (self.latency - self.ttft) / (self.output_len - 1)

    @property
    def normalized_latency(self) -> float | None:
        return self.latency / self.output_len if self.output_len > 0 else None


@dataclass
class Stats:
    """Mean, median and tail of one metric, in milliseconds (or the metric's own unit)."""

    mean: float
    median: float
    p90: float
    p99: float
    std: float
    count: int

    @classmethod
    def of(cls, values: Sequence[float], scale: float = 1.0) -> "Stats":
        if len(values) == 0:
            return cls(0.0, 0.0, 0.0, 0.0, 0.0, 0)
        arr = np.asarray(values, dtype=np.float64) * scale
        # Linear interpolation between order statistics, numpy's default (as vLLM reports).
        p50, p90, p99 = np.percentile(arr, PERCENTILES)
        return cls(float(arr.mean()), float(p50), float(p90), float(p99), float(arr.std()), int(arr.size))


@dataclass
class BenchmarkMetrics:
    duration_s: float
    completed: int
    failed: int
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float  # completed requests / s
    output_throughput: float  # generated tokens / s
    total_token_throughput: float  # (prompt + generated) tokens / s
    goodput: float | None  # requests / s meeting every SLO; None when no SLO was given
    ttft_ms: Stats
    tpot_ms: Stats
    itl_ms: Stats
    e2el_ms: Stats
    normalized_latency_ms: Stats  # ms per generated token (the paper's y-axis, median)
    slos_ms: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def parse_slos(specs: Sequence[str] | None) -> dict[str, float]:
    """`ttft:500 tpot:100` (milliseconds) -> {"ttft": 500.0, "tpot": 100.0}."""
    slos: dict[str, float] = {}
    for spec in specs or []:
        for item in str(spec).replace(",", " ").split():
            name, sep, value = item.partition(":")
            if not sep or name not in SLO_METRICS:
                raise ValueError(f"SLO {item!r}: expected NAME:MS with NAME in {SLO_METRICS}")
            ms = float(value)
            if ms <= 0:
                raise ValueError(f"SLO {item!r}: the bound must be positive")
            slos[name] = ms
    return slos


def meets_slos(r: RequestResult, slos_ms: dict[str, float]) -> bool:
    values = {"ttft": r.ttft, "tpot": r.tpot, "e2el": r.latency, "normalized_latency": r.normalized_latency}
    for name, bound in slos_ms.items():
        v = values[name]
        # A one-token request has no TPOT; it cannot violate a TPOT bound.
        if v is not None and v * 1000.0 > bound:
            return False
    return True


def compute_metrics(results: Sequence[RequestResult], duration_s: float,
                    slos_ms: dict[str, float] | None = None) -> BenchmarkMetrics:
    """Summary of a run; failed requests count only in `failed`."""
    ok = [r for r in results if r.success]
    slos_ms = dict(slos_ms or {})
    out_tokens = sum(r.output_len for r in ok)
    in_tokens = sum(r.prompt_len for r in ok)
    d = duration_s if duration_s > 0 else float("nan")
    goodput = None
    if slos_ms:
        goodput = sum(1 for r in ok if meets_slos(r, slos_ms)) / d
    return BenchmarkMetrics(
        duration_s=duration_s,
        completed=len(ok),
        failed=len(results) - len(ok),
        total_input_tokens=in_tokens,
        total_output_tokens=out_tokens,
        request_throughput=len(ok) / d,
        output_throughput=out_tokens / d,
        total_token_throughput=(in_tokens + out_tokens) / d,
        goodput=goodput,
        ttft_ms=Stats.of([r.ttft for r in ok], 1000.0),
        tpot_ms=Stats.of([t for r in ok if (t := r.tpot) is not None], 1000.0),
        itl_ms=Stats.of([g for r in ok for g in r.itl], 1000.0),
        e2el_ms=Stats.of([r.latency for r in ok], 1000.0),
        normalized_latency_ms=Stats.of([n for r in ok if (n := r.normalized_latency) is not None], 1000.0),
        slos_ms=slos_ms,
    )

