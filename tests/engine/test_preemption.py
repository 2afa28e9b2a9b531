"""The paged policy with a KV pool too small for the batch: requests are preempted and recomputed
many times, and what the caller sees is exactly what it sees with plenty of memory (greedy: also
what transformers generates), for greedy and seeded sampling, with one or two batches in flight."""
from __future__ import annotations

import pytest
import torch

from orcinus.engine.llm_engine import LLMEngine
from orcinus.executor.model_runner import kv_bytes_per_block
from orcinus.sampling_params import SamplingParams
from references import hf_generate_greedy

BLOCK = 4


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 320, (int(k),), generator=g).tolist() for k in torch.randint(6, 30, (n,), generator=g)]


def _engine(folder: str, num_blocks: int | None = None, **kw) -> LLMEngine:
    memory = 1 << 22
    if num_blocks is not None:
        probe = LLMEngine.from_kwargs(model=folder, skip_tokenizer_init=True, dtype="float32",
                                      kv_cache_memory=1 << 16, block_size=BLOCK)
        memory = num_blocks * kv_bytes_per_block(probe.model_config, BLOCK, torch.float32)
    return LLMEngine.from_kwargs(model=folder, skip_tokenizer_init=True, dtype="float32", kv_cache_memory=memory,
                                 block_size=BLOCK, **kw)


def _run(engine: LLMEngine, prompts, params: list[SamplingParams]) -> dict[str, list[list[int]]]:
    """Runs to completion; checks every streamed update only extends what was already returned."""
    for i, (p, sp) in enumerate(zip(prompts, params)):
        engine.add_request(f"r{i}", {"prompt_token_ids": p}, sp)
    seen: dict[str, list[list[int]]] = {}
    done: dict[str, list[list[int]]] = {}
    steps = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            now = [c.token_ids for c in out.outputs]
            before = seen.get(out.request_id, [[] for _ in now])
            for old, new in zip(before, now):
                assert new[:len(old)] == old, "a streamed token was changed or repeated"
            seen[out.request_id] = now
            if out.finished:
                done[out.request_id] = now
        steps += 1
        assert steps < 5000
    assert engine.free_all_check()
    return done


@pytest.mark.parametrize("n_workers", [1, 2])
def test_greedy_outputs_survive_many_preemptions(n_workers, checkpoint_factory):
    folder, hf_model = checkpoint_factory("llama")
    prompts = _prompts(8, seed=1)
    params = [SamplingParams(max_tokens=20 + i, temperature=0.0, ignore_eos=True) for i in range(len(prompts))]
    plenty = _run(_engine(folder, scheduler_policy="orca"), prompts, params)
    small = _engine(folder, num_blocks=16, scheduler_policy="paged", n_workers=n_workers, max_num_seqs=8)
    got = _run(small, prompts, params)
    assert small.scheduler.num_preemptions >= 5
    assert small.stats().num_preemptions_total == small.scheduler.num_preemptions
    assert got == plenty
    for i in (0, 5):
        assert got[f"r{i}"][0] == hf_generate_greedy(hf_model, prompts[i], params[i].max_tokens)


@pytest.mark.parametrize("n_workers", [1, 2])
def test_seeded_sampling_continues_its_random_stream_after_preemption(n_workers, checkpoint_factory):
    folder, _ = checkpoint_factory("llama")
    prompts = _prompts(6, seed=2)
    params = [SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, seed=100 + i, presence_penalty=0.5,
                             ignore_eos=True, n=1 if i else 2) for i in range(len(prompts))]
    plenty = _run(_engine(folder, scheduler_policy="orca"), prompts, params)
    small = _engine(folder, num_blocks=18, scheduler_policy="paged", n_workers=n_workers, max_num_seqs=8,
                    enable_prefix_caching=False)
    got = _run(small, prompts, params)
    assert small.scheduler.num_preemptions >= 3
    assert got == plenty


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_preemption_and_chunks_across_worker_processes(tp, pp, checkpoint_factory):
    """Tensor-parallel ranks each park their own generator; two pipeline stages keep two batches in
    flight, whose requests must never be preempted. Seeded outputs still equal one process with
    plenty of memory."""
    folder, _ = checkpoint_factory("llama")
    prompts = _prompts(6, seed=1)
    params = [SamplingParams(max_tokens=20, temperature=0.9, seed=10 + i, ignore_eos=True) for i in range(6)]
    plenty = _run(_engine(folder, scheduler_policy="orca"), prompts, params)
    probe = LLMEngine.from_kwargs(model=folder, skip_tokenizer_init=True, dtype="float32", kv_cache_memory=1 << 16,
                                  block_size=BLOCK)
    per_block = kv_bytes_per_block(probe.model_config, BLOCK, torch.float32) // (tp * pp)  # one rank's share
    engine = LLMEngine.from_kwargs(model=folder, skip_tokenizer_init=True, dtype="float32", block_size=BLOCK,
                                   kv_cache_memory=16 * per_block, scheduler_policy="paged", tensor_parallel_size=tp,
                                   pipeline_parallel_size=pp, max_num_batched_tokens=8)
    try:
        assert engine.kv_cache.num_blocks == 16
        assert _run(engine, prompts, params) == plenty
        assert engine.scheduler.num_preemptions > 0
    finally:
        engine.shutdown()
