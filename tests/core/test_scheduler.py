"""Scheduler properties, checked on a simulated engine loop (no model: tokens are made up).

The loop below follows Orca's Algorithm 1: launch batches until n_workers are in flight, then
wait for the oldest, append one token to each of its requests, return finished ones at once.
Hypothesis drives it through both policies, token budgets, pipelines of several workers, and
aborts and failed iterations that land while batches are in flight; after every step the block
bookkeeping is checked against what the scheduler believes (`check_invariants`).
Hypothesis runs derandomized and without deadlines, so the same examples run on every machine.
"""
from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orcinus.core.kv_cache import KVCacheManager
from orcinus.core.policies import make_scheduler
from orcinus.core.scheduler import Scheduler
from orcinus.request import FinishReason, Request, RequestRejected, RequestState
from orcinus.sampling_params import SamplingParams

HYPOTHESIS = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                      suppress_health_check=[HealthCheck.too_slow])


def make_request(i: int, prompt_len: int, max_new: int) -> Request:
    return Request(request_id=f"r{i:03d}", prompt_token_ids=[5] * prompt_len,
                   sampling_params=SamplingParams(max_tokens=max_new), max_new_tokens=max_new)


def check_invariants(sched: Scheduler, kv: KVCacheManager) -> None:
    """What must hold between any two scheduler calls, whatever happened before."""
    tables = dict(kv._tables)
    # No block is owned twice, none is both owned and free, and none is lost.
    owned = [b for t in tables.values() for b in t]
    free = kv.pool.free_blocks()
    assert len(owned) == len(set(owned)), "a block is in two block tables"
    assert len(free) == len(set(free)), "a block is free twice"
    assert not set(owned) & set(free), "a block is both owned and free"
    assert sorted(owned + free) == list(range(kv.num_blocks)), "a block was lost or invented"
    # Blocks belong only to requests still in the pool (anything else is a leak).
    assert set(tables) <= set(sched.pool), f"blocks held by departed requests {set(tables) - set(sched.pool)}"
    reserved = 0
    for rid, req in sched.pool.items():
        if req.state == RequestState.INITIATION:
            assert rid not in tables, f"{rid} holds blocks before it was admitted"
            continue
        # Admitted: its table covers its whole worst case (Orca reserves up front), so it can
        # never run out of KV space mid-way.
        assert req.state in (RequestState.RUNNING, RequestState.INCREMENT), (rid, req.state)
        need = kv.blocks_needed(req.max_total_tokens)
        assert len(tables.get(rid, ())) >= need, f"{rid} holds {len(tables.get(rid, ()))} blocks, reserved {need}"
        reserved += need * kv.block_size
    assert reserved <= kv.n_slots


@dataclass
class Plan:
    policy: str
    n_workers: int
    num_blocks: int
    block_size: int
    max_num_seqs: int
    budget: int | None
    arrivals: list[tuple[int, Request]]
    aborts: dict[int, list[int]] = field(default_factory=dict)  # tick -> indices into arrivals
    failing_batches: set[int] = field(default_factory=set)  # ordinals of returned batches that fail


def simulate(plan: Plan, max_iterations: int = 5_000):
    kv = KVCacheManager(plan.num_blocks, plan.block_size)
    sched = make_scheduler(plan.policy, kv, plan.max_num_seqs, max_model_len=10_000,
                           max_num_batched_tokens=plan.budget)
    pending = deque(sorted(plan.arrivals, key=lambda a: a[0]))
    in_flight: deque = deque()
    log = {"batches": [], "returned_at": {}, "finished_at": {}, "iterations_of": {}, "aborted": set()}
    by_index = [r for _, r in plan.arrivals]
    added: set[str] = set()
    n_returned_batches = 0

    def returned(req: Request, it: int) -> None:
        assert req.request_id not in log["returned_at"], f"{req.request_id} returned twice"
        assert req.is_finished
        log["returned_at"][req.request_id] = it
        log["iterations_of"][req.request_id] = req.num_iterations

    it = 0
    while pending or sched.has_unfinished() or in_flight:
        assert it < max_iterations, "the schedule did not drain: a request waits forever"
        while pending and pending[0][0] <= it:
            req = pending.popleft()[1]
            sched.add_request(req)
            added.add(req.request_id)
            check_invariants(sched, kv)
        for idx in plan.aborts.get(it, ()):
            req = by_index[idx]
            if req.request_id not in added:
                continue
            was_running = req.state == RequestState.RUNNING
            out = sched.abort(req.request_id)
            if out is not None:  # not in flight: gone now
                assert not was_running and out.finish_reason == FinishReason.ABORT
                log["aborted"].add(req.request_id)
                returned(out, it)
            check_invariants(sched, kv)
        while len(in_flight) < plan.n_workers:
            before = {rid: r.state for rid, r in sched.pool.items()}
            batch = sched.schedule()
            check_invariants(sched, kv)
            if batch is None:
                break
            ids = [r.request_id for r in batch.requests]
            assert len(ids) == len(set(ids)) and 1 <= len(ids) <= plan.max_num_seqs
            for other in in_flight:  # batches in flight hold disjoint requests
                assert set(ids).isdisjoint(r.request_id for r in other.requests)
            for req in batch.requests:
                assert before[req.request_id] != RequestState.RUNNING
                assert req.state == RequestState.RUNNING
            if plan.budget is not None and len(ids) > 1:
                # A lone request may exceed the budget (its prompt must run somehow); a batch may not.
                assert batch.num_tokens <= plan.budget, (batch.num_tokens, plan.budget)
            newcomers = [r for r in batch.requests if before[r.request_id] == RequestState.INITIATION]
            if plan.policy == "static" and newcomers:
                # Request-level batching: a batch forms only from newcomers, when nobody else runs.
                assert len(newcomers) == len(ids)
                assert not in_flight
                others = [r for rid, r in sched.pool.items() if rid not in set(ids)]
                assert all(r.state == RequestState.INITIATION for r in others)
            log["batches"].append((it, ids))
            in_flight.append(batch)
        if in_flight:
            batch = in_flight.popleft()
            ordinal = n_returned_batches
            n_returned_batches += 1
            for req, n in zip(batch.requests, batch.num_new_tokens):
                # Past its prompt a request brings one token; a prompt comes whole, or in chunks
                # under a token budget (never more than what is left of it).
                left = req.num_tokens - req.num_computed_tokens
                assert 1 <= n <= left, (n, left)
                if plan.budget is None:
                    assert n == left
                if req.num_computed_tokens >= req.num_prompt_tokens:
                    assert n == 1
            if ordinal in plan.failing_batches:
                done = sched.fail_batch(batch)
                assert {r.request_id for r in done} == {r.request_id for r in batch.requests}
                for req in done:
                    assert req.finish_reason in (FinishReason.ABORT, FinishReason.LENGTH)
                    log["aborted"].add(req.request_id)
                    returned(req, it)
            else:
                for req, n in zip(batch.requests, batch.num_new_tokens):
                    req.num_computed_tokens += n
                    req.num_iterations += 1
                    if req.num_computed_tokens < req.num_tokens:
                        continue  # a prompt chunk short of the end samples nothing
                    req.output_token_ids.append(7)
                    if len(req.output_token_ids) >= req.max_new_tokens:
                        req.state = RequestState.FINISHED
                        req.finish_reason = FinishReason.LENGTH
                        log["finished_at"][req.request_id] = it
                done = sched.finish_batch(batch)
                for req in done:
                    if req.finish_reason == FinishReason.ABORT:
                        log["aborted"].add(req.request_id)
                    returned(req, it)
                for req in batch.requests:  # everyone not returned goes on
                    assert req.is_finished == (req in done)
            check_invariants(sched, kv)
        it += 1
    return sched, kv, log


@st.composite
def plans(draw, policies=("orca", "static"), with_faults: bool = True) -> Plan:
    policy = draw(st.sampled_from(policies))
    n_workers = draw(st.integers(1, 3))
    block_size = draw(st.sampled_from([1, 4, 8]))
    max_num_seqs = draw(st.integers(1, 6))
    budget = draw(st.one_of(st.none(), st.integers(1, 64)))
    n = draw(st.integers(1, 14))
    reqs = draw(st.lists(st.tuples(st.integers(0, 30), st.integers(1, 30), st.integers(1, 12)), min_size=n, max_size=n))
    biggest = max(-(-(p + m) // block_size) for _, p, m in reqs)
    num_blocks = biggest + draw(st.integers(0, 12))  # every request fits alone; not all together
    arrivals = [(t, make_request(i, p, m)) for i, (t, p, m) in enumerate(reqs)]
    aborts: dict[int, list[int]] = {}
    failing: set[int] = set()
    if with_faults:
        for tick, idx in draw(st.lists(st.tuples(st.integers(0, 60), st.integers(0, n - 1)), max_size=4)):
            aborts.setdefault(tick, []).append(idx)
        failing = set(draw(st.lists(st.integers(0, 40), max_size=3)))
    return Plan(policy, n_workers, num_blocks, block_size, max_num_seqs, budget, arrivals, aborts, failing)


@HYPOTHESIS
@given(plans())
def test_invariants_hold_under_any_schedule(plan: Plan) -> None:
    sched, kv, log = simulate(plan)
    assert not sched.has_unfinished()
    assert kv.all_free()  # every block back in the pool
    for _, req in plan.arrivals:
        rid = req.request_id
        assert rid in log["returned_at"], f"{rid} never came back"
        if rid in log["aborted"]:
            assert len(req.output_token_ids) <= req.max_new_tokens
        else:  # every request that ran to the end got exactly its tokens, returned the iteration it finished
            assert len(req.output_token_ids) == req.max_new_tokens
            assert log["returned_at"][rid] == log["finished_at"][rid]


@HYPOTHESIS
@given(plans(policies=("orca",), with_faults=False))
def test_orca_iteration_level_fcfs(plan: Plan) -> None:
    """At any moment an earlier request has run at least as many iterations as a later one, unless
    it is already done (arrival order = id order within the same arrival tick)."""
    _, _, log = simulate(plan)
    order = [r.request_id for _, r in sorted(plan.arrivals, key=lambda a: a[0])]
    runs = {rid: 0 for rid in order}
    for _, ids in log["batches"]:
        for rid in ids:
            runs[rid] += 1
        for a, b in zip(order, order[1:]):
            a_done = runs[a] == log["iterations_of"][a]
            assert a_done or runs[a] >= runs[b], f"{a} ran {runs[a]} iterations but later {b} ran {runs[b]}"


def test_invariant_checker_catches_a_missing_reservation() -> None:
    """The checker itself can fail: an admitted request whose table is short is reported."""
    kv = KVCacheManager(num_blocks=8, block_size=4)
    sched = make_scheduler("orca", kv, max_num_seqs=4, max_model_len=1000)
    sched.add_request(make_request(0, 6, 6))
    sched.schedule()
    check_invariants(sched, kv)
    kv.pool.release(kv._tables["r000"].pop())  # simulate a scheduler that under-reserves
    with pytest.raises(AssertionError, match="reserved"):
        check_invariants(sched, kv)


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


def test_token_budget_bounds_a_batch_but_never_starves_a_long_prompt():
    kv = KVCacheManager(num_blocks=64, block_size=4)
    sched = make_scheduler("orca", kv, max_num_seqs=8, max_model_len=1000, max_num_batched_tokens=10)
    long, a, b = make_request(0, 12, 2), make_request(1, 4, 2), make_request(2, 5, 2)
    for r in (long, a, b):
        sched.add_request(r)
    first = sched.schedule()
    assert [r.request_id for r in first.requests] == ["r000"]  # 12 > 10, but alone it must still run
    second = sched.schedule()
    assert [r.request_id for r in second.requests] == ["r001", "r002"]  # 4 + 5 = 9 fits
    assert second.num_tokens <= 10


def test_static_policy_admits_nobody_mid_batch():
    arrivals = [(0, make_request(0, 4, 3)), (0, make_request(1, 4, 10)), (2, make_request(2, 4, 2))]
    _, kv, log = simulate(Plan("static", 1, 64, 4, 4, None, arrivals))
    assert kv.all_free()
    first_batch_end = log["returned_at"]["r001"]
    joined = [it for it, ids in log["batches"] if "r002" in ids]
    assert min(joined) > first_batch_end  # r002 waits for the whole first batch
    # a finished member is returned at once, not held until the batch ends
    assert log["returned_at"]["r000"] < log["returned_at"]["r001"]


def test_orca_lets_newcomers_join_mid_way():
    arrivals = [(0, make_request(0, 4, 3)), (0, make_request(1, 4, 10)), (2, make_request(2, 4, 2))]
    _, _, log = simulate(Plan("orca", 1, 64, 4, 4, None, arrivals))
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


def test_abort_and_failure_with_two_batches_in_flight():
    """n_workers = 2: one batch fails and a request of the other is aborted while both are out."""
    kv = KVCacheManager(num_blocks=16, block_size=4)
    sched = make_scheduler("orca", kv, max_num_seqs=1, max_model_len=1000)
    reqs = [make_request(i, 3, 3) for i in range(3)]
    for r in reqs:
        sched.add_request(r)
    b0, b1 = sched.schedule(), sched.schedule()
    assert [r.request_id for r in b0.requests] == ["r000"] and [r.request_id for r in b1.requests] == ["r001"]
    assert sched.abort("r001") is None
    failed = sched.fail_batch(b0)
    assert [r.request_id for r in failed] == ["r000"] and reqs[0].finish_reason == FinishReason.ABORT
    check_invariants(sched, kv)
    done = sched.finish_batch(b1)
    assert [r.request_id for r in done] == ["r001"] and reqs[1].finish_reason == FinishReason.ABORT
    check_invariants(sched, kv)
    assert set(sched.pool) == {"r002"} and not kv.holds("r000") and not kv.holds("r001")


def test_seeded_random_loads_drain():
    """A few large loads (more requests than hypothesis draws), each seeded."""
    for seed in range(3):
        rng = random.Random(seed)
        arrivals = [(rng.randrange(0, 60), make_request(i, rng.randint(1, 40), rng.randint(1, 30))) for i in range(40)]
        sched, kv, _ = simulate(Plan("orca", 1 + seed, 12, 8, 6, None, arrivals))
        assert not sched.has_unfinished() and kv.all_free()
