"""Prompt log-probs with pipeline and tensor parallelism: the last stage computes them (every
tensor-parallel rank there takes part in the gathered LM head, the first answers), split by
chunked prefill, and they equal transformers' as on one process."""
from __future__ import annotations

import multiprocessing

import pytest

from orcinus.config import EngineConfig
from orcinus.engine.llm_engine import LLMEngine
from orcinus.sampling_params import SamplingParams
from references import check_prompt_logprobs

K = 4
PROMPT = [5, 9, 11, 40, 7, 100, 3, 250, 17, 18, 19, 60, 61, 62, 63, 64, 8, 9, 10, 200, 201, 4, 5]
OTHER = [30, 31, 32, 33, 34, 35, 36]


@pytest.mark.parametrize("tp, pp", [(1, 2), (2, 1)])
def test_parallel_prompt_logprobs_match_transformers(tp, pp, checkpoint_factory):
    folder, hf_model = checkpoint_factory("llama")
    engine = LLMEngine(EngineConfig(model=folder, skip_tokenizer_init=True, dtype="float32", kv_cache_memory=1 << 22,
                                    block_size=4, max_num_batched_tokens=8, tensor_parallel_size=tp,
                                    pipeline_parallel_size=pp))
    try:
        engine.add_request("a", {"prompt_token_ids": PROMPT},
                           SamplingParams(max_tokens=3, temperature=0.0, prompt_logprobs=K))
        engine.add_request("b", {"prompt_token_ids": OTHER}, SamplingParams(max_tokens=3, temperature=0.0))
        done = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out
    finally:
        engine.shutdown()
    assert not multiprocessing.active_children()
    check_prompt_logprobs(done["a"], hf_model, PROMPT, K)
    assert done["b"].prompt_logprobs is None
