"""When each request of a trace is sent: Poisson, fixed-rate or all at once.

Arrival offsets are drawn up front from their own seeded generator, so the same trace at the
same rate arrives identically in every run and against every system being compared.
"""
from __future__ import annotations

import math
import random
from typing import Literal, Sequence

from orcinus.bench.workloads import BenchRequest

ArrivalMode = Literal["poisson", "fixed", "all-at-once"]
ARRIVAL_MODES: tuple[str, ...] = ("poisson", "fixed", "all-at-once")


def arrival_offsets(n: int, rate: float, mode: ArrivalMode = "poisson", seed: int = 0) -> list[float]:
    """Seconds after the start at which each of n requests is sent; the first is sent at 0.

    rate is in requests/s; an infinite rate (or mode all-at-once) sends everything at 0.
    Poisson: exponential gaps with mean 1/rate (the paper's arrival process). Fixed: gaps of
    exactly 1/rate.
    """
    if mode not in ARRIVAL_MODES:
        raise ValueError(f"unknown arrival mode {mode!r}; choose one of {ARRIVAL_MODES}")
    if n < 0:
        raise ValueError("n must be non-negative")
    if mode == "all-at-once" or math.isinf(rate):
        return [0.0] * n
    if rate <= 0:
        raise ValueError("rate must be positive (use inf or all-at-once for no pacing)")
    if mode == "fixed":
        return [i / rate for i in range(n)]
    rng = random.Random(seed)
    offsets: list[float] = []
    t = 0.0
    for i in range(n):
        if i > 0:  # the first request starts the clock, so a run never begins by idling
            t += rng.expovariate(rate)
        offsets.append(t)
    return offsets


def with_arrivals(trace: Sequence[BenchRequest], rate: float, mode: ArrivalMode = "poisson",
                  seed: int = 0) -> list[BenchRequest]:
    """Copies of the trace's requests stamped with arrival offsets (the trace itself is untouched)."""
    offsets = arrival_offsets(len(trace), rate, mode, seed)
    return [BenchRequest(r.prompt_token_ids, r.output_len, r.prompt_text, off) for r, off in zip(trace, offsets)]


def parse_rate(text: str) -> float:
    """`inf` (or `all`) means no pacing; otherwise a positive float in requests/s."""
    if str(text).strip().lower() in ("inf", "all", "infinity"):
        return math.inf
    rate = float(text)
    if rate <= 0:
        raise ValueError(f"request rate must be positive, got {text!r}")
    return rate
