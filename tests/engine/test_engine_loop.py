"""The engine's loop without a model: `LLMEngine(config, executor=ScriptedExecutor(...))`.

What is checked here does not depend on the model's numbers: that every request gets the tokens
its workers sampled, in order, across chunked prompts, preemptions and failures; that each abort
rule leaves the engine consistent (no request left behind, every KV block free, the workers told
to forget every request); and the plain data the engine sends. The same rules with a real model
are covered by test_failure_isolation.py, test_preemption.py and test_chunked_prefill.py."""
from __future__ import annotations

import pytest

from orcinus.config import EngineConfig
from orcinus.engine.llm_engine import EngineStepError, LLMEngine
from orcinus.errors import RequestRejected, WorkerDied
from orcinus.executor.messages import NewRequestData
from orcinus.sampling_params import SamplingParams
from scripted_executor import ScriptedExecutor, default_script

BLOCK = 4


def _engine(executor: ScriptedExecutor | None = None, **kw) -> tuple[LLMEngine, ScriptedExecutor]:
    executor = executor or ScriptedExecutor()
    config = EngineConfig(skip_tokenizer_init=True, block_size=BLOCK, device="cpu", **kw)
    return LLMEngine(config, executor=executor), executor


def _greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def _run(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, list[int]]:
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, {"prompt_token_ids": prompt}, params)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = list(out.outputs[0].token_ids)
    return done


def _expected(rid: str, n: int) -> list[int]:
    return [default_script(rid, i) for i in range(n)]


def _consistent(engine: LLMEngine, executor: ScriptedExecutor) -> None:
    assert engine.free_all_check() and not engine.has_unfinished_requests()
    assert executor.generated == {}  # the workers were told to forget every request


def test_the_engine_drives_any_executor_and_returns_its_tokens():
    engine, executor = _engine()
    assert engine.model_path == "scripted" and engine.kv_cache.num_blocks == 64
    got = _run(engine, {"a": ([5, 6, 7], _greedy(5)), "b": ([8] * 9, _greedy(3))})
    assert got == {"a": _expected("a", 5), "b": _expected("b", 3)}
    _consistent(engine, executor)
    assert engine.generation_tokens_total == 8
    engine.shutdown()
    assert executor.shut_down


@pytest.mark.parametrize("policy", ["orca", "paged", "static"])
def test_a_prompt_several_times_the_budget_is_sent_in_chunks(policy):
    engine, executor = _engine(scheduler_policy=policy, max_num_batched_tokens=16, enable_prefix_caching=False)
    requests = {"s0": ([3] * 9, _greedy(12)), "long": (list(range(3, 73)), _greedy(6)), "s1": ([4] * 5, _greedy(10))}
    got = _run(engine, requests)
    assert got == {rid: _expected(rid, p.max_tokens) for rid, (_, p) in requests.items()}
    assert engine.generation_tokens_total == 28  # chunks that stop short of the end sample nothing
    chunks = [r.num_new_tokens for m in executor.sent for r in m.requests if r.request_id == "long"]
    assert sum(chunks[:-5]) == 70 and all(c <= 16 for c in chunks)  # 70 prompt tokens, then 5 decodes
    assert all(n <= 16 for n in (sum(r.num_new_tokens or 0 for r in m.requests) for m in executor.sent))
    _consistent(engine, executor)


def test_preempted_requests_resume_with_their_tokens():
    # 12 blocks of 4 slots: five requests of 8 + 16 tokens cannot all hold their KV at once.
    engine, executor = _engine(ScriptedExecutor(num_blocks=12), scheduler_policy="paged", max_num_seqs=8)
    requests = {f"r{i}": ([5 + i] * 8, _greedy(16)) for i in range(5)}
    got = _run(engine, requests)
    assert got == {rid: _expected(rid, 16) for rid in requests}
    assert engine.stats().num_preemptions_total > 0
    resumed = [r for m in executor.sent for r in m.requests if isinstance(r, NewRequestData) and r.output_token_ids]
    assert resumed  # sent again as new, with what it had generated, to be recomputed
    _consistent(engine, executor)


def test_a_request_too_big_even_alone_is_refused_at_submission():
    engine, executor = _engine(ScriptedExecutor(num_blocks=8), scheduler_policy="paged")  # 32 slots
    with pytest.raises(RequestRejected, match="KV cache"):
        engine.add_request("big", {"prompt_token_ids": [5] * 20}, SamplingParams(max_tokens=20))
    assert _run(engine, {"ok": ([5] * 20, _greedy(12))}) == {"ok": _expected("ok", 12)}
    _consistent(engine, executor)


def test_a_failing_request_is_isolated_and_the_others_keep_their_tokens():
    def fail(msg):
        return ValueError("top_k=7 is not supported by this kernel") if "culprit" in msg.request_ids else None

    engine, executor = _engine(ScriptedExecutor(fail=fail))
    requests = {"a": ([5, 6, 7], _greedy(6)), "b": ([9, 10], _greedy(6))}
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, {"prompt_token_ids": prompt}, params)
    engine.add_request("culprit", {"prompt_token_ids": [15, 16]}, _greedy(6))
    done, errors = {}, []
    while engine.has_unfinished_requests():
        try:
            outs = engine.step()
        except EngineStepError as exc:
            errors.append(exc)
            continue
        done.update({o.request_id: list(o.outputs[0].token_ids) for o in outs if o.finished})
    assert done == {rid: _expected(rid, 6) for rid in requests}
    (error,) = errors
    assert error.request_ids == ["culprit"] and not error.whole_batch
    _consistent(engine, executor)


def test_an_interrupt_while_waiting_aborts_the_batch_and_leaves_the_engine_consistent():
    interrupt = {"armed": False}

    def fail(msg):
        if interrupt["armed"] and msg.requests:
            interrupt["armed"] = False
            return KeyboardInterrupt()
        return None

    engine, executor = _engine(ScriptedExecutor(fail=fail))
    engine.add_request("a", {"prompt_token_ids": [5, 6, 7]}, _greedy(3))
    engine.step()
    interrupt["armed"] = True
    with pytest.raises(KeyboardInterrupt):
        while engine.has_unfinished_requests():
            engine.step()
    assert engine.free_all_check() and not engine.has_unfinished_requests()
    assert _run(engine, {"a": ([5, 6, 7], _greedy(3))}) == {"a": _expected("a", 3)}  # the id is free again
    _consistent(engine, executor)


def test_a_dead_worker_aborts_everything_in_flight():
    dead = {"now": False}
    engine, executor = _engine(ScriptedExecutor(fail=lambda msg: WorkerDied("worker 0 exited") if dead["now"] else None),
                               n_workers=2)
    for rid in ("a", "b", "c"):
        engine.add_request(rid, {"prompt_token_ids": [5, 6]}, _greedy(8))
    engine.step()
    dead["now"] = True
    with pytest.raises(WorkerDied):
        while engine.has_unfinished_requests():
            engine.step()
    assert engine.free_all_check() and not engine.has_unfinished_requests()


def test_observers_see_every_step_and_the_batches_it_launched():
    engine, executor = _engine(max_num_batched_tokens=8, enable_prefix_caching=False)
    seen = []
    engine.add_observer(seen.append)
    got = _run(engine, {"a": ([5] * 10, _greedy(3)), "b": ([6] * 3, _greedy(2))})
    assert got == {"a": _expected("a", 3), "b": _expected("b", 2)}
    launched = [b for it in seen for b in it.launched]
    assert len(launched) == len([m for m in executor.sent if m.requests])  # one entry per batch sent
    assert sum(b.num_prompt_tokens for b in launched) == 13  # every prompt position, once
    # prompts, then one decode per sampled token except each request's last
    assert sum(b.num_tokens for b in launched) == 13 + (3 - 1) + (2 - 1)
    assert all(b.num_tokens <= 8 for b in launched)
    # what the simulator's calibration reads: a chunk short of its prompt's end samples nothing
    # ("a"'s 10-token prompt runs in two chunks under the budget of 8)
    assert sum(b.num_sampled for b in launched) == 5
    assert all(b.num_sampled <= b.num_requests for b in launched)
    assert all(b.kv_tokens >= b.num_tokens and b.keys_seen >= b.num_tokens for b in launched)
    assert seen[-1].stats.generation_tokens_total == 5 and seen[-1].stats.num_running == 0
    engine.remove_observer(seen.append)
    steps = len(seen)
    _run(engine, {"c": ([7], _greedy(2))})
    assert len(seen) == steps  # removed: no longer called
