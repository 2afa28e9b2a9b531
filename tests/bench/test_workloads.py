"""Trace generators: length distributions, special-token exclusion, arrivals, seed reproducibility."""
import math
import statistics

import pytest

from orcinus.bench.arrivals import arrival_offsets, parse_rate, with_arrivals
from orcinus.bench.workloads import (ORCA_OUTPUT_LEN, ORCA_PROMPT_LEN, LengthRange, TokenSampler, orca_trace,
                                     random_trace, trace_summary)


def test_length_range_parse():
    assert LengthRange.parse("32:256") == LengthRange(32, 256)
    assert LengthRange.parse("7") == LengthRange(7, 7)
    with pytest.raises(ValueError):
        LengthRange.parse("5:2")
    with pytest.raises(ValueError):
        LengthRange.parse("0:3")


def test_orca_trace_follows_the_papers_distributions():
    trace = orca_trace(2000, TokenSampler(1000), seed=1)
    p = [r.prompt_len for r in trace]
    o = [r.output_len for r in trace]
    assert min(p) >= 32 and max(p) <= 512 and min(o) >= 1 and max(o) <= 128
    # Uniform: the mean sits mid-range, and both ends of the range are reached.
    assert abs(statistics.mean(p) - (32 + 512) / 2) < 10
    assert abs(statistics.mean(o) - (1 + 128) / 2) < 3
    assert min(o) == ORCA_OUTPUT_LEN.low and max(o) == ORCA_OUTPUT_LEN.high
    assert min(p) < ORCA_PROMPT_LEN.low + 5 and max(p) > ORCA_PROMPT_LEN.high - 5
    # Prompt token ids really have the drawn length.
    assert all(len(r.prompt_token_ids) == r.prompt_len for r in trace)


def test_random_trace_ranges_and_seed():
    make = lambda seed: random_trace(50, LengthRange(100, 1024), LengthRange(16, 128), TokenSampler(500), seed)
    a, b, c = make(0), make(0), make(1)
    assert [(r.prompt_token_ids, r.output_len) for r in a] == [(r.prompt_token_ids, r.output_len) for r in b]
    assert [r.prompt_token_ids for r in a] != [r.prompt_token_ids for r in c]
    assert all(100 <= r.prompt_len <= 1024 and 16 <= r.output_len <= 128 for r in a)
    s = trace_summary(a)
    assert s["num_requests"] == 50 and s["output_tokens"] == sum(r.output_len for r in a)


def test_token_sampler_avoids_special_tokens():
    sampler = TokenSampler(20, frozenset({0, 1, 2, 19}))
    trace = random_trace(30, LengthRange(50, 60), LengthRange(1, 1), sampler, seed=3)
    ids = {t for r in trace for t in r.prompt_token_ids}
    assert ids <= set(range(3, 19)) and len(ids) == 16  # every allowed id shows up, no excluded one


def test_poisson_arrivals_have_the_asked_rate_and_are_reproducible():
    offs = arrival_offsets(4000, rate=4.0, mode="poisson", seed=7)
    assert offs[0] == 0.0 and offs == sorted(offs)
    gaps = [b - a for a, b in zip(offs, offs[1:])]
    assert abs(statistics.mean(gaps) - 0.25) < 0.02
    assert abs(statistics.pstdev(gaps) - 0.25) < 0.03  # exponential: std == mean
    assert offs == arrival_offsets(4000, rate=4.0, mode="poisson", seed=7)
    assert offs != arrival_offsets(4000, rate=4.0, mode="poisson", seed=8)


def test_fixed_and_all_at_once_arrivals():
    assert arrival_offsets(4, 2.0, "fixed") == [0.0, 0.5, 1.0, 1.5]
    assert arrival_offsets(3, 2.0, "all-at-once") == [0.0, 0.0, 0.0]
    assert arrival_offsets(3, math.inf, "poisson") == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError):
        arrival_offsets(3, 0.0, "poisson")
    assert parse_rate("inf") == math.inf and parse_rate("2.5") == 2.5


def test_with_arrivals_leaves_the_trace_alone():
    trace = orca_trace(5, TokenSampler(100), seed=0)
    timed = with_arrivals(trace, 1.0, "fixed")
    assert [r.arrival_offset for r in timed] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert all(r.arrival_offset == 0.0 for r in trace)
    assert [r.prompt_token_ids for r in timed] == [r.prompt_token_ids for r in trace]


def test_shared_prefix_trace_shares_its_prefix_token_for_token():
    sampler = TokenSampler(500, frozenset({0, 1}))
    make = lambda seed: random_trace(40, LengthRange(8, 32), LengthRange(4, 16), sampler, seed, shared_prefix_len=64)
    a, b, c = make(5), make(5), make(6)
    prefix = a[0].prompt_token_ids[:64]
    assert all(r.prompt_token_ids[:64] == prefix for r in a)  # every prompt starts with the same 64 ids
    assert len(set(prefix)) > 30 and not {0, 1} & set(prefix)  # random, and without the special ids
    # after the prefix the prompts differ from each other (their own part)
    assert len({tuple(r.prompt_token_ids[64:]) for r in a}) == len(a)
    assert all(64 + 8 <= r.prompt_len <= 64 + 32 and 4 <= r.output_len <= 16 for r in a)
    # deterministic given the seed; another seed gives another prefix
    assert [(r.prompt_token_ids, r.output_len) for r in a] == [(r.prompt_token_ids, r.output_len) for r in b]
    assert c[0].prompt_token_ids[:64] != prefix
    # the per-request parts and lengths are exactly those of the same trace without a prefix
    plain = random_trace(40, LengthRange(8, 32), LengthRange(4, 16), sampler, 5)
    assert [(r.prompt_token_ids[64:], r.output_len) for r in a] == [(r.prompt_token_ids, r.output_len) for r in plain]


def test_shared_prefix_is_refused_where_it_cannot_work():
    from orcinus.bench.trace_builder import TraceSpec, build_trace

    with pytest.raises(ValueError, match="random or orca"):
        build_trace(TraceSpec("sharegpt", 4, shared_prefix_len=32), None)
    with pytest.raises(ValueError, match="0 or more"):
        build_trace(TraceSpec("random", 4, shared_prefix_len=-1), None)
