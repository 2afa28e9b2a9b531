"""Chunked prefill and prefix caching through the engine: a prompt computed in pieces (over
several iterations, or partly taken from cached blocks) gives the same tokens as one computed at
once, which are transformers' greedy tokens."""
from __future__ import annotations

import pytest
import torch

from orcinus.engine.llm_engine import LLMEngine
from orcinus.sampling_params import SamplingParams
from references import hf_generate_greedy

BLOCK = 4


def _engine(folder: str, **kw) -> LLMEngine:
    return LLMEngine.from_kwargs(model=folder, skip_tokenizer_init=True, dtype="float32", kv_cache_memory=1 << 22,
                                 block_size=BLOCK, **kw)


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(3, 320, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _generate(engine: LLMEngine, prompts, params) -> list[list[list[int]]]:
    for i, (p, sp) in enumerate(zip(prompts, params)):
        engine.add_request(f"r{i}", {"prompt_token_ids": p}, sp)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = [c.token_ids for c in out.outputs]
    assert engine.free_all_check()
    return [done[f"r{i}"] for i in range(len(prompts))]


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, **kw)


@pytest.mark.parametrize("policy", ["orca", "paged", "static"])
def test_prompt_several_times_the_budget_matches_transformers(policy, checkpoint_factory):
    folder, hf_model = checkpoint_factory("llama")
    long = _prompt(70, seed=1)  # 70 tokens, budget 16: five chunks, only the last samples
    short = [_prompt(9, seed=2), _prompt(5, seed=3)]
    prompts = [short[0], long, short[1]]
    params = [greedy(12), greedy(6), greedy(10)]
    engine = _engine(folder, scheduler_policy=policy, max_num_batched_tokens=16, enable_prefix_caching=False)
    got = _generate(engine, prompts, params)
    for p, sp, out in zip(prompts, params, got):
        assert out[0] == hf_generate_greedy(hf_model, p, sp.max_tokens)
    assert engine.generation_tokens_total == 28  # chunks that stop short of the end sample nothing


def test_chunked_seeded_sampling_matches_unchunked(checkpoint_factory):
    folder, _ = checkpoint_factory("llama")
    prompts = [_prompt(40, seed=4), _prompt(7, seed=5)]
    params = [SamplingParams(max_tokens=10, temperature=1.0, seed=7, ignore_eos=True)] * 2
    whole = _generate(_engine(folder, scheduler_policy="orca"), prompts, params)
    chunked = _generate(_engine(folder, scheduler_policy="paged", max_num_batched_tokens=6), prompts, params)
    assert chunked == whole


def test_shared_system_prompt_hits_the_cache_and_matches(checkpoint_factory):
    folder, hf_model = checkpoint_factory("llama")
    system = _prompt(21, seed=6)  # five full blocks
    prompts = [system + _prompt(k, seed=10 + k) for k in (3, 8, 5)]
    engine = _engine(folder, scheduler_policy="paged")
    assert engine.kv_cache.enable_prefix_caching  # on by default for paged
    first = _generate(engine, prompts[:1], [greedy(6)])
    hits = engine.kv_cache.prefix_hits
    rest = _generate(engine, prompts[1:], [greedy(6), greedy(6)])  # arrive after the first finished
    assert engine.kv_cache.prefix_hits - hits == 2 * 20
    for p, out in zip(prompts, first + rest):
        assert out[0] == hf_generate_greedy(hf_model, p, 6)
    off = _engine(folder, scheduler_policy="paged", enable_prefix_caching=False)
    assert _generate(off, prompts, [greedy(6)] * 3) == first + rest
    assert off.kv_cache.prefix_hits == 0


def test_multi_turn_chat_reuses_the_previous_turn(checkpoint_factory):
    folder, hf_model = checkpoint_factory("llama")
    engine = _engine(folder, scheduler_policy="paged")
    turn1 = _prompt(14, seed=8)
    answer1 = _generate(engine, [turn1], [greedy(9)])[0][0]
    turn2 = turn1 + answer1 + _prompt(6, seed=9)
    stats = engine.stats()
    answer2 = _generate(engine, [turn2], [greedy(7)])[0][0]
    # the first turn's prompt and answer were computed: every full block of them is reused
    # (its last token was sampled, never computed, so 22 of 23 tokens are cached: 5 blocks)
    assert engine.stats().prefix_cache_hits_total - stats.prefix_cache_hits_total == 20
    assert answer2 == hf_generate_greedy(hf_model, turn2, 7)


def test_n2_siblings_share_their_prompt_blocks(checkpoint_factory):
    folder, _ = checkpoint_factory("llama")
    prompt = _prompt(17, seed=11)
    params = SamplingParams(n=2, max_tokens=8, temperature=1.0, seed=3, ignore_eos=True)
    engine = _engine(folder, scheduler_policy="paged")
    engine.add_request("pair", {"prompt_token_ids": prompt}, params)
    engine.step()  # both siblings admitted in one iteration; the second reuses the first's blocks
    t0, t1 = engine.kv_cache.block_table("pair#0"), engine.kv_cache.block_table("pair#1")
    assert t0[:4] == t1[:4] and t0[4:] != t1[4:]
    assert engine.kv_cache.prefix_hits == 16
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.free_all_check()
    plain = _engine(folder, scheduler_policy="orca")
    shared = _generate(_engine(folder, scheduler_policy="paged"), [prompt], [params])
    assert shared == _generate(plain, [prompt], [params])
