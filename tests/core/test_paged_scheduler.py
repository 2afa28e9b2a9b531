"""The paged policy, chunked prefill and prefix caching on a simulated engine (no model).

The fake model reads its KV: every iteration writes each computed token into the slot its block
table names, and the token a request samples is a function of what it *reads back* from all of
its slots. So a block handed to two requests, a cached block with the wrong content, a recompute
that skips a position, or a sample taken from a non-final chunk all change the output, and the
outputs are compared with a run that has plenty of memory and no budget.
"""
from __future__ import annotations

import random
import zlib
from collections import deque

import pytest

from orcinus.core.kv_cache import KVCacheManager
from orcinus.core.policies import make_scheduler
from orcinus.request import FinishReason, Request, RequestState
from orcinus.sampling_params import SamplingParams

VOCAB = 50


def next_token(context: list[int]) -> int:
    return zlib.crc32(bytes(t % 256 for t in context)) % VOCAB


def make_request(i: int, prompt: list[int], max_new: int) -> Request:
    return Request(request_id=f"r{i:03d}", prompt_token_ids=list(prompt),
                   sampling_params=SamplingParams(max_tokens=max_new), max_new_tokens=max_new)


def simulate(policy, arrivals, num_blocks, block_size=4, max_num_seqs=8, n_workers=1, budget=None,
             prefix_caching=False, max_iterations=20_000):
    kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=prefix_caching)
    sched = make_scheduler(policy, kv, max_num_seqs, max_model_len=10_000, max_num_batched_tokens=budget)
    slots: dict[int, int] = {}  # the fake KV pool: slot -> token written there
    pending = deque(sorted(arrivals, key=lambda a: a[0]))
    in_flight: deque = deque()
    log = {"max_reserved": 0, "samples": 0, "chunks": 0}
    it = 0
    while (pending or sched.has_unfinished() or in_flight) and it < max_iterations:
        while pending and pending[0][0] <= it:
            sched.add_request(pending.popleft()[1])
        while len(in_flight) < n_workers:
            batch = sched.schedule()
            if batch is None:
                break
            if budget is not None:
                assert batch.num_tokens <= budget
            assert len(batch.requests) <= max_num_seqs
            for other in in_flight:
                assert {r.request_id for r in batch.requests}.isdisjoint(r.request_id for r in other.requests)
            tables = {r.request_id: list(kv.block_table(r.request_id)) for r in batch.requests}
            if not prefix_caching:  # without sharing, no block is owned twice
                held = [b for rid in list(sched.pool) if kv.holds(rid) for b in kv.block_table(rid)]
                assert len(held) == len(set(held))
            log["max_reserved"] = max(log["max_reserved"], kv.num_reserved_slots())
            # the iteration runs at launch (as the single-process executor does): write, then read
            sampled = {}
            for req, n in zip(batch.requests, batch.num_new_tokens):
                table, start = tables[req.request_id], req.num_computed_tokens
                for pos in range(start, start + n):
                    slots[table[pos // block_size] * block_size + pos % block_size] = req.all_token_ids[pos]
            for req, n in zip(batch.requests, batch.num_new_tokens):
                table, end = tables[req.request_id], req.num_computed_tokens + n
                seen = [slots.get(table[p // block_size] * block_size + p % block_size) for p in range(end)]
                assert seen == req.all_token_ids[:end], f"{req.request_id} reads KV it did not write"
                if end == req.num_tokens:
                    sampled[req.request_id] = next_token(seen)
            in_flight.append((batch, sampled))
        if in_flight:
            batch, sampled = in_flight.popleft()
            for req, n in zip(batch.requests, batch.num_new_tokens):
                req.num_computed_tokens += n
                if req.request_id not in sampled:
                    log["chunks"] += 1
                    continue
                log["samples"] += 1
                req.output_token_ids.append(sampled[req.request_id])
                if len(req.output_token_ids) >= req.max_new_tokens:
                    req.state = RequestState.FINISHED
                    req.finish_reason = FinishReason.LENGTH
            sched.finish_batch(batch)
        it += 1
    assert it < max_iterations, "the simulation did not finish"
    return sched, kv, log


def workload(seed: int, n: int = 30, shared_prefix: int = 0):
    rng = random.Random(seed)
    system = [rng.randrange(VOCAB) for _ in range(shared_prefix)]
    return [(rng.randrange(0, 40), system + [rng.randrange(VOCAB) for _ in range(rng.randint(1, 30))],
             rng.randint(1, 40)) for _ in range(n)]


def run(spec, policy, **kw):
    arrivals = [(t, make_request(i, p, m)) for i, (t, p, m) in enumerate(spec)]
    sched, kv, log = simulate(policy, arrivals, **kw)
    assert not sched.has_unfinished() and kv.all_free()
    return {r.request_id: r.output_token_ids for _, r in arrivals}, sched, kv, log


@pytest.mark.parametrize("n_workers", [1, 2])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_paged_small_pool_preempts_and_outputs_match_plenty_of_memory(seed, n_workers):
    spec = workload(seed)
    expected, *_ = run(spec, "orca", num_blocks=10_000)
    got, sched, kv, log = run(spec, "paged", num_blocks=24, n_workers=n_workers)
    assert got == expected
    assert sched.num_preemptions > 0  # the pool really was too small for the batch
    assert log["max_reserved"] <= kv.n_slots


def test_paged_runs_more_requests_than_orca_reservation_allows():
    spec = [(0, [1, 2, 3], 60) for _ in range(6)]  # each reserves 63 slots = 16 blocks under Orca
    orca = make_scheduler("orca", KVCacheManager(20, 4), 8, 10_000)
    paged = make_scheduler("paged", KVCacheManager(20, 4), 8, 10_000)
    for i, (_, p, m) in enumerate(spec):
        orca.add_request(make_request(i, p, m))
        paged.add_request(make_request(i, p, m))
    assert len(orca.schedule().requests) == 1  # 16 of 20 blocks reserved by the first
    assert len(paged.schedule().requests) == 6  # one block each for the prompt


def test_a_request_that_fits_alone_runs_even_when_preempted_repeatedly():
    spec = [(0, [7] * 5, 40), (0, [8] * 5, 40), (1, [9] * 3, 41)]  # 45 slots: 12 of 12 blocks alone
    got, sched, *_ = run(spec, "paged", num_blocks=12)
    assert all(len(v) in (40, 41) for v in got.values())
    assert sched.num_preemptions > 0


@pytest.mark.parametrize("policy", ["orca", "paged", "static"])
@pytest.mark.parametrize("budget", [3, 8, 17])
def test_chunked_prefill_matches_unchunked(policy, budget):
    spec = workload(5, n=12)
    spec.append((3, [(i * 7) % VOCAB for i in range(60)], 5))  # a prompt several times the budget
    expected, *_ = run(spec, "orca", num_blocks=10_000)
    got, _, _, log = run(spec, policy, num_blocks=10_000 if policy != "paged" else 40, budget=budget)
    assert got == expected
    assert log["chunks"] > 0


def test_budget_serves_running_requests_first():
    kv = KVCacheManager(100, 4)
    sched = make_scheduler("orca", kv, 8, 10_000, max_num_batched_tokens=10)
    first = make_request(0, [1] * 3, 5)
    sched.add_request(first)
    batch = sched.schedule()
    first.num_computed_tokens = 3
    first.output_token_ids.append(4)
    sched.finish_batch(batch)
    sched.add_request(make_request(1, [2] * 30, 5))
    batch = sched.schedule()
    assert [r.request_id for r in batch.requests] == ["r000", "r001"]
    assert batch.num_new_tokens == [1, 9]  # the newcomer gets what the decode left


@pytest.mark.parametrize("policy", ["paged", "orca"])
def test_prefix_caching_outputs_match_and_hit(policy):
    spec = workload(7, n=20, shared_prefix=13)  # a shared "system prompt" of 3+ blocks
    expected, *_ = run(spec, "orca", num_blocks=10_000)
    got, _, kv, _ = run(spec, policy, num_blocks=200, prefix_caching=True)
    assert got == expected
    assert kv.prefix_hits >= 12 * 15  # all but the first few requests reuse 3 full blocks
    assert kv.prefix_queries == sum(len(p) for _, p, _ in spec)


def test_prefix_cache_survives_finish_and_evicts_under_pressure():
    turn1 = [(0, [3] * 9, 4)]
    out1, _, kv, _ = run(turn1, "paged", num_blocks=8, prefix_caching=True)
    # a second turn extends the first conversation: same KV manager, so its blocks are still cached
    sched = make_scheduler("paged", kv, 8, 10_000)
    conversation = [3] * 9 + out1["r000"] + [5, 6]
    req = make_request(1, conversation, 2)
    sched.add_request(req)
    before = kv.prefix_hits
    batch = sched.schedule()
    assert kv.prefix_hits - before == 12  # three full blocks: 9 prompt + 3 generated tokens
    assert batch.num_new_tokens == [len(conversation) - 12]
    req.state = RequestState.FINISHED
    sched.finish_batch(batch)
    assert kv.pool.num_cached >= 3 and kv.all_free()  # finished, but its blocks stay findable
    # pressure: a request needing the whole pool evicts every cached block
    big = make_request(2, [9] * 31, 1)
    sched.add_request(big)
    assert sched.schedule().requests == [big]
    assert kv.num_free_blocks == 0


def test_siblings_share_prompt_blocks():
    kv = KVCacheManager(64, 4, enable_prefix_caching=True)
    sched = make_scheduler("paged", kv, 8, 10_000)
    prompt = list(range(1, 18))  # 4 full blocks + 1 token
    a, b = make_request(0, prompt, 3), make_request(1, prompt, 3)
    sched.add_request(a)
    sched.add_request(b)
    batch = sched.schedule()
    assert batch.num_new_tokens == [17, 1]  # the sibling computes only its last token
    shared = kv.block_table("r000")[:4]
    assert kv.block_table("r001")[:4] == shared
    assert all(kv.pool.ref_count[x] == 2 for x in shared)


def test_in_flight_requests_are_never_preempted():
    kv = KVCacheManager(5, 4)
    sched = make_scheduler("paged", kv, 8, 10_000)
    reqs = [make_request(i, [i + 1] * 4, 14) for i in range(3)]
    for r in reqs:
        sched.add_request(r)
    first = sched.schedule()  # all three admitted, one block each
    for r in first.requests:
        r.num_computed_tokens = 4
        r.output_token_ids.append(1)
    sched.finish_batch(first)
    sched.max_num_batched_tokens = 1  # one request per batch from now on (the earliest: r000)
    # make r000 the most recently admitted, as after a re-admission: the first victim if not in flight
    sched._admitted["r000"] = max(sched._admitted.values()) + 1
    held = None
    for _ in range(100):
        batch = sched.schedule()
        if batch is None:
            break
        (req,) = batch.requests
        if held is None and req is reqs[0]:
            held = batch  # stays in flight while the others grow and run out of blocks
            continue
        req.num_computed_tokens += batch.num_new_tokens[0]
        if req.num_computed_tokens == req.num_tokens:
            req.output_token_ids.append(1)
        sched.finish_batch(batch)
    assert held is not None and sched.num_preemptions > 0
    assert reqs[0].state == RequestState.RUNNING and kv.holds("r000")
    assert "r000" not in sched.take_preempted()
