"""The engine, its schedulers and KV accounting run unchanged on the simulated executor: outputs,
finish reasons, preemption, chunked prefill, prefix caching, pipelining, aborts."""
from __future__ import annotations

import dataclasses
import random

import pytest

from orcinus.config import EngineConfig
from orcinus.sampling_params import SamplingParams
from orcinus.sim.cost_model import Parallel
from orcinus.sim.engine import SimTarget, build_sim_engine
from orcinus.sim.hardware import load_hardware
from orcinus.sim.shapes import PRESETS, ModelShape

TINY = ModelShape("tiny", num_layers=4, hidden_size=256, num_heads=4, num_kv_heads=2, head_dim=64,
                  intermediate_size=512, vocab_size=1000, max_position_embeddings=2048, eos_token_id=7)


def _target(pp: int = 1) -> SimTarget:
    return SimTarget(TINY, load_hardware("a100-40gb"), Parallel(1, pp))


def _run(engine) -> dict[str, object]:
    outs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outs[out.request_id] = out
    return outs


def _prompts(n: int, seed: int = 0, lo: int = 8, hi: int = 64) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(8, 1000) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


@pytest.mark.parametrize("policy", ["orca", "static", "paged"])
def test_max_tokens_and_eos_finish_as_on_a_real_executor(policy: str) -> None:
    lengths = {f"r{i}": 3 + i for i in range(6)}  # EOS after 3..8 tokens
    engine, executor = build_sim_engine(EngineConfig(scheduler_policy=policy, max_num_seqs=4), _target(), lengths)
    for i, prompt in enumerate(_prompts(6)):
        engine.add_request(f"r{i}", {"prompt_token_ids": prompt}, SamplingParams(max_tokens=6))
    outs = _run(engine)
    for i in range(6):
        c = outs[f"r{i}"].outputs[0]
        if 3 + i <= 6:  # EOS first: stop, the EOS id is the last token
            assert c.finish_reason == "stop" and len(c.token_ids) == 3 + i and c.token_ids[-1] == 7
        else:
            assert c.finish_reason == "length" and len(c.token_ids) == 6 and 7 not in c.token_ids
    assert engine.free_all_check()
    assert executor.stats.iterations > 0 and executor.clock.now > 0


def test_ignore_eos_and_min_tokens_hold_off_the_oracles_eos() -> None:
    engine, _ = build_sim_engine(EngineConfig(), _target(), {"a": 2, "b": 2})
    engine.add_request("a", {"prompt_token_ids": [11, 12, 13]}, SamplingParams(max_tokens=5, ignore_eos=True))
    engine.add_request("b", {"prompt_token_ids": [11, 12, 13]}, SamplingParams(max_tokens=5, min_tokens=4))
    outs = _run(engine)
    assert len(outs["a"].outputs[0].token_ids) == 5 and outs["a"].outputs[0].finish_reason == "length"
    # min_tokens: the engine ignores EOS before 4 tokens; the oracle keeps answering EOS after its length
    assert len(outs["b"].outputs[0].token_ids) == 4 and outs["b"].outputs[0].finish_reason == "stop"


def test_paged_preempts_under_a_small_pool_and_every_request_still_completes() -> None:
    # 24 blocks of 16 tokens for 12 requests of up to 64 + 40 tokens: the pool must preempt.
    kv_bytes = 24 * 16 * 2 * TINY.num_layers * TINY.num_kv_heads * TINY.head_dim * 2
    config = EngineConfig(scheduler_policy="paged", max_num_seqs=12, kv_cache_memory=kv_bytes)
    engine, _ = build_sim_engine(config, _target())
    assert engine.kv_cache.num_blocks == 24
    prompts = _prompts(12, seed=3, lo=30, hi=64)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", {"prompt_token_ids": p}, SamplingParams(max_tokens=40, ignore_eos=True))
    outs = _run(engine)
    assert engine.scheduler.num_preemptions > 0
    assert all(len(outs[f"r{i}"].outputs[0].token_ids) == 40 for i in range(12))
    assert engine.free_all_check()


def test_chunked_prefill_and_prefix_caching_are_the_engines_own() -> None:
    config = EngineConfig(scheduler_policy="paged", max_num_seqs=8, max_num_batched_tokens=64)
    engine, executor = build_sim_engine(config, _target(), record_iterations=True)
    shared = list(range(100, 164))  # 4 full blocks every prompt shares
    for i in range(4):
        engine.add_request(f"r{i}", {"prompt_token_ids": shared + [200 + i] * 40}, SamplingParams(max_tokens=3,
                                                                                                ignore_eos=True))
    _run(engine)
    assert max(t for _, _, t, _ in executor.stats.per_iteration) <= 64  # the budget held every iteration
    assert engine.kv_cache.prefix_hits >= 3 * 64  # the later prompts found the shared blocks
    assert engine.free_all_check()


def test_aborting_in_flight_frees_blocks() -> None:
    engine, _ = build_sim_engine(EngineConfig(scheduler_policy="orca", max_num_seqs=4), _target(pp=2))
    for i, p in enumerate(_prompts(4)):
        engine.add_request(f"r{i}", {"prompt_token_ids": p}, SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    engine.abort_request("r1")
    outs = _run(engine)
    assert "r1" not in outs and len(outs) == 3
    assert engine.free_all_check()


def test_two_stages_keep_two_batches_in_flight() -> None:
    engine, executor = build_sim_engine(EngineConfig(scheduler_policy="orca", max_num_seqs=2), _target(pp=2))
    for i, p in enumerate(_prompts(4)):
        engine.add_request(f"r{i}", {"prompt_token_ids": p}, SamplingParams(max_tokens=20, ignore_eos=True))
    engine.step()
    assert len(engine._in_flight) == 2  # Orca's pipeline: one batch per stage
    _run(engine)
    assert engine.free_all_check()


def test_a_175b_model_needs_no_weights_and_sizes_its_pool_from_the_hardware() -> None:
    target = SimTarget(PRESETS["gpt3-175b"], load_hardware("a100-40gb"), Parallel(8, 2))
    engine, executor = build_sim_engine(EngineConfig(scheduler_policy="orca"), target)
    # 40 GB x 0.9 less 21.9 GB of weights per GPU, 48 layers x 12 heads x 128 x 2 (K, V) x 2 bytes per token
    per_token = 2 * 48 * 12 * 128 * 2
    weights = (175e9 / 16 + 50257 * 12288 / 8) * 2
    expected_tokens = (40e9 * 0.9 - weights) / per_token
    assert abs(engine.kv_cache.n_slots - expected_tokens) / expected_tokens < 0.05
    assert executor.model_path == "gpt3-175b"


def test_parallel_samples_and_logprobs_come_back_per_row() -> None:
    engine, _ = build_sim_engine(EngineConfig(scheduler_policy="paged"), _target())
    engine.add_request("g", {"prompt_token_ids": [20, 21, 22, 23]},
                       SamplingParams(n=3, max_tokens=4, logprobs=1, ignore_eos=True, temperature=0.8, seed=1))
    outs = _run(engine)
    completions = outs["g"].outputs
    assert len(completions) == 3
    assert all(len(c.token_ids) == 4 and len(c.logprobs) == 4 for c in completions)
    assert engine.free_all_check()


def test_the_simulated_pool_follows_kv_cache_dtype():
    """The cost model's KV bytes per token follow kv_cache_dtype as the real engine resolves it:
    a float16 pool beside float32 activations holds twice the tokens of a float32 one."""
    from orcinus.sim.engine import sim_kv_dtype

    target = dataclasses.replace(_target(), dtype="float32")
    full, _ = build_sim_engine(EngineConfig(kv_cache_dtype="float32"), target, {})
    half, _ = build_sim_engine(EngineConfig(kv_cache_dtype="float16"), target, {})
    assert half.kv_cache.num_blocks >= 2 * full.kv_cache.num_blocks - 1
    assert sim_kv_dtype(EngineConfig(), target) == "float32"  # a GPU, unquantized shape: the serving dtype
