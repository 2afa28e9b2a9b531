"""Tensor parallelism on CPU (gloo, two spawned worker processes): greedy tokens equal a single
process and transformers; seeded sampling equals a single process; bad splits are refused at
start-up with a message naming the setting; no worker process outlives its engine."""
from __future__ import annotations

import multiprocessing

import pytest

from orcinus.config import EngineConfig
from orcinus.engine.llm_engine import LLMEngine
from orcinus.sampling_params import SamplingParams
from references import hf_generate_greedy

GREEDY = dict(temperature=0.0, ignore_eos=True)
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32]]


def _engine(folder: str, tp: int) -> LLMEngine:
    return LLMEngine(EngineConfig(model=folder, skip_tokenizer_init=True, dtype="float32", kv_cache_memory=1 << 22,
                                  block_size=4, tensor_parallel_size=tp))


def _generate(engine: LLMEngine, params: list[SamplingParams]) -> dict[str, list[list[int]]]:
    """Staggered arrivals, so batches mix initiation and increment requests."""
    results: dict[str, list[list[int]]] = {}
    it = 0
    while it < len(PROMPTS) or engine.has_unfinished_requests():
        if it < len(PROMPTS):
            engine.add_request(f"r{it}", {"prompt_token_ids": PROMPTS[it]}, params[it])
        for out in engine.step():
            if out.finished:
                results[out.request_id] = [o.token_ids for o in out.outputs]
        it += 1
    assert engine.free_all_check()
    return results


# llama: GQA split 2+2 heads; mistral: one KV head replicated on both ranks, sliding window;
# qwen3: q/k norms, tied embeddings; gpt2: fused q/k/v in [in, out] layout; opt: biases, narrower
# word embeddings with projections.
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen3", "gpt2", "opt"])
def test_tp2_greedy_equals_single_process_and_transformers(arch, checkpoint_factory):
    folder, hf_model = checkpoint_factory(arch)
    greedy = [SamplingParams(max_tokens=n, **GREEDY) for n in (6, 9, 4)]
    seeded = [SamplingParams(max_tokens=6, temperature=1.0, top_p=0.9, seed=s, ignore_eos=True) for s in (1, 2, 3)]
    seeded[1] = SamplingParams(n=2, max_tokens=6, temperature=0.8, top_k=40, seed=7, ignore_eos=True)
    engine = _engine(folder, 2)
    try:
        tp_greedy = _generate(engine, greedy)
        tp_seeded = _generate(engine, seeded) if arch == "llama" else None
        assert len(engine.executor._procs) == 2
    finally:
        engine.shutdown()
    single = _engine(folder, 1)
    assert tp_greedy == _generate(single, greedy)
    for i, p in enumerate(PROMPTS):
        assert tp_greedy[f"r{i}"] == [hf_generate_greedy(hf_model, p, greedy[i].max_tokens)]
    if tp_seeded is not None:
        assert tp_seeded == _generate(single, seeded)
        assert len({tuple(t) for t in tp_seeded["r1"]}) == 2  # the two samples differ: sampling happened
    assert not multiprocessing.active_children()


def test_heads_not_divisible_is_refused(checkpoint_factory):
    folder, _ = checkpoint_factory("llama")  # 4 attention heads
    with pytest.raises(ValueError, match=r"attention heads \(4\) is not divisible by tensor_parallel_size=3"):
        _engine(folder, 3)
    assert not multiprocessing.active_children()
