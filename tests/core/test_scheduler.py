"""Scheduler properties, checked on a simulated engine loop (no model: tokens are made up).

The loop below follows Orca's Algorithm 1: launch batches until n_workers are in flight, then
wait for the oldest, append one token to each of its requests, return finished ones at once.
"""
from __future__ import annotations

import random
from collections import deque

import pytest

from orcinus.core.kv_cache import KVCacheManager
from orcinus.core.scheduler import make_scheduler
from orcinus.request import FinishReason, Request, RequestRejected, RequestState
from orcinus.sampling_params import SamplingParams


def make_request(i: int, prompt_len: int, max_new: int) -> Request:
    return Request(request_id=f"r{i:03d}", prompt_token_ids=[5] * prompt_len,
                   sampling_params=SamplingParams(max_tokens=max_new), max_new_tokens=max_new)


def simulate(policy: str, n_workers: int, num_blocks: int, block_size: int, max_num_seqs: int,
             arrivals: list[tuple[int, Request]], max_iterations: int = 10_000):
    kv = KVCacheManager(num_blocks, block_size)
    sched = make_scheduler(policy, kv, max_num_seqs, max_model_len=10_000)
    pending = deque(sorted(arrivals, key=lambda a: a[0]))
    in_flight: deque = deque()
    log = {"batches": [], "returned_at": {}, "finished_at": {}, "iterations_of": {}, "max_reserved": 0}
    it = 0
    while (pending or sched.has_unfinished() or in_flight) and it < max_iterations:
        while pending and pending[0][0] <= it:
            sched.add_request(pending.popleft()[1])
        while len(in_flight) < n_workers:
            batch = sched.schedule()
            if batch is None:
                break
            ids = {r.request_id for r in batch.requests}
            for other in in_flight:  # batches in flight hold disjoint requests
                assert ids.isdisjoint({r.request_id for r in other.requests})
            log["max_reserved"] = max(log["max_reserved"], kv.num_reserved_slots())
            assert kv.num_reserved_slots() <= kv.n_slots
            assert len(batch.requests) <= max_num_seqs
            log["batches"].append((it, [r.request_id for r in batch.requests]))
            in_flight.append(batch)
        if in_flight:
            batch = in_flight.popleft()
            for req, n in zip(batch.requests, batch.num_new_tokens):
                assert n == (req.num_prompt_tokens if req.num_computed_tokens == 0 else 1)
                req.num_computed_tokens += n
                req.num_iterations += 1
                req.output_token_ids.append(7)
                if len(req.output_token_ids) >= req.max_new_tokens:
                    req.state = RequestState.FINISHED
                    req.finish_reason = FinishReason.LENGTH
                    log["finished_at"][req.request_id] = it
            for req in sched.finish_batch(batch):
                log["returned_at"][req.request_id] = it
                log["iterations_of"][req.request_id] = req.num_iterations
        it += 1
    return sched, kv, log


def random_arrivals(seed: int, n: int = 40) -> list[tuple[int, Request]]:
    rng = random.Random(seed)
    return [(rng.randrange(0, 60), make_request(i, rng.randint(1, 40), rng.randint(1, 30))) for i in range(n)]


@pytest.mark.parametrize("n_workers", [1, 2, 3])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_orca_properties(n_workers, seed):
    arrivals = random_arrivals(seed)
    sched, kv, log = simulate("orca", n_workers, num_blocks=12, block_size=8, max_num_seqs=6, arrivals=arrivals)
    assert not sched.has_unfinished()
    assert kv.all_free()  # every block back in the pool
    assert log["max_reserved"] <= kv.n_slots
    # every request finished with exactly its tokens and was returned the iteration it finished
    for _, req in arrivals:
        assert len(req.output_token_ids) == req.max_new_tokens
        assert log["returned_at"][req.request_id] == log["finished_at"][req.request_id]
    # iteration-level FCFS: at any moment an earlier request has run at least as many iterations
    # as a later one (arrival order = id order within the same arrival tick)
    order = [r.request_id for _, r in sorted(arrivals, key=lambda a: a[0])]
    runs = {rid: 0 for rid in order}
    for _, ids in log["batches"]:
        for rid in ids:
            runs[rid] += 1
        for a, b in zip(order, order[1:]):
            a_done = runs[a] == log["iterations_of"][a]
            assert a_done or runs[a] >= runs[b], f"{a} ran {runs[a]} iterations but later {b} ran {runs[b]}"


def test_orca_reserves_worst_case_and_breaks_in_fcfs_order():
    kv = KVCacheManager(num_blocks=4, block_size=4)  # 16 slots
    sched = make_scheduler("orca", kv, max_num_seqs=8, max_model_len=1000)
    big = make_request(0, 6, 6)  # 12 slots -> 3 blocks
    small_blocked = make_request(1, 4, 4)  # 8 slots -> 2 blocks: does not fit beside big
    tiny = make_request(2, 1, 1)  # 1 block: would fit, but FCFS breaks before it
    for r in (big, small_blocked, tiny):
        sched.add_request(r)
    batch = sched.schedule()
    assert [r.request_id for r in batch.requests] == ["r000"]
    assert kv.num_used_blocks == 3


def test_static_policy_admits_nobody_mid_batch():
    arrivals = [(0, make_request(0, 4, 3)), (0, make_request(1, 4, 10)), (2, make_request(2, 4, 2))]
    _, kv, log = simulate("static", 1, num_blocks=64, block_size=4, max_num_seqs=4, arrivals=arrivals)
    assert kv.all_free()
    first_batch_end = log["returned_at"]["r001"]
    joined = [it for it, ids in log["batches"] if "r002" in ids]
    assert min(joined) > first_batch_end  # r002 waits for the whole first batch
    # a finished member is returned at once, not held until the batch ends
    assert log["returned_at"]["r000"] < log["returned_at"]["r001"]


def test_orca_lets_newcomers_join_mid_way():
    arrivals = [(0, make_request(0, 4, 3)), (0, make_request(1, 4, 10)), (2, make_request(2, 4, 2))]
    _, _, log = simulate("orca", 1, num_blocks=64, block_size=4, max_num_seqs=4, arrivals=arrivals)
    assert log["returned_at"]["r002"] < log["returned_at"]["r001"]


@pytest.mark.parametrize("policy", ["orca", "static"])
def test_impossible_requests_are_rejected_at_submission(policy):
    kv = KVCacheManager(num_blocks=4, block_size=4)
    sched = make_scheduler(policy, kv, max_num_seqs=4, max_model_len=20)
    with pytest.raises(RequestRejected, match="KV cache"):
        sched.add_request(make_request(0, 10, 8))  # 18 <= 20 context, but > 16 slots
    with pytest.raises(RequestRejected, match="context length"):
        sched.add_request(make_request(1, 15, 8))  # 23 > 20
    assert not sched.has_unfinished()


def test_abort_frees_blocks_now_or_when_batch_returns():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    sched = make_scheduler("orca", kv, max_num_seqs=4, max_model_len=1000)
    a, b = make_request(0, 4, 4), make_request(1, 4, 4)
    sched.add_request(a)
    batch = sched.schedule()
    sched.add_request(b)
    assert sched.abort("r001").finish_reason == FinishReason.ABORT  # waiting: freed at once
    assert sched.abort("r000") is None  # in flight: deferred
    assert kv.num_used_blocks == 2
    done = sched.finish_batch(batch)
    assert [r.request_id for r in done] == ["r000"] and a.finish_reason == FinishReason.ABORT
    assert kv.all_free()
