"""Prompt log-probs (SamplingParams.prompt_logprobs) equal transformers' log_softmax at every
prompt position, for the next prompt token: its own value and rank, and the top-k set, with the
prompt split over iterations by chunked prefill, batched with requests that do not ask, with its
prefix already in the prefix cache, under preemption, and with n > 1."""
from __future__ import annotations

import pytest
import torch

from orcinus.engine.llm import LLM
from orcinus.engine.llm_engine import LLMEngine
from orcinus.executor.messages import NewRequestData
from orcinus.executor.model_runner import kv_bytes_per_block
from orcinus.request import RequestOutput
from orcinus.sampling_params import SamplingParams, SamplingParamsError
from references import check_prompt_logprobs, hf_prompt_logprobs

K = 4
PROMPT = [5, 9, 11, 40, 7, 100, 3, 250, 17, 18, 19, 60, 61, 62, 63, 64, 8, 9, 10, 200, 201, 4, 5]
OTHER = [30, 31, 32, 33, 34, 35, 36, 37, 38]


def _llm(folder: str, **kw) -> LLM:
    return LLM(folder, skip_tokenizer_init=True, dtype="float32", device="cpu", kv_cache_memory=1 << 22,
               block_size=4, **kw)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_prompt_logprobs_match_transformers_chunked_and_batched(arch, checkpoint_factory):
    folder, hf_model = checkpoint_factory(arch)
    # a budget of 7 tokens splits PROMPT (23 tokens) over four iterations, beside the other request
    llm = _llm(folder, max_num_batched_tokens=7)
    outs = llm.generate([{"prompt_token_ids": PROMPT}, {"prompt_token_ids": OTHER}],
                        [SamplingParams(max_tokens=3, temperature=0.0, prompt_logprobs=K),
                         SamplingParams(max_tokens=3, temperature=0.0)], use_tqdm=False)
    check_prompt_logprobs(outs[0], hf_model, PROMPT, K)
    assert outs[1].prompt_logprobs is None  # not asked: not computed


def test_zero_gives_only_each_prompt_tokens_own(checkpoint_factory):
    folder, hf_model = checkpoint_factory("llama")
    out = _llm(folder).generate({"prompt_token_ids": PROMPT}, SamplingParams(max_tokens=1, prompt_logprobs=0),
                                use_tqdm=False)[0]
    ref = hf_prompt_logprobs(hf_model, PROMPT)
    assert [list(e) if e else None for e in out.prompt_logprobs] == [None] + [[t] for t in PROMPT[1:]]
    for i in range(1, len(PROMPT)):
        assert out.prompt_logprobs[i][PROMPT[i]].logprob == pytest.approx(float(ref[i - 1, PROMPT[i]]), abs=1e-4)


def test_a_cached_prefix_is_recomputed_for_prompt_logprobs(checkpoint_factory):
    folder, hf_model = checkpoint_factory("llama")
    llm = _llm(folder, enable_prefix_caching=True)
    engine = llm.engine
    llm.generate({"prompt_token_ids": PROMPT}, SamplingParams(max_tokens=1), use_tqdm=False)
    hits = engine.kv_cache.prefix_hits
    # the same prompt again, now asking: its blocks are all cached, yet every position is scored
    out = llm.generate({"prompt_token_ids": PROMPT}, SamplingParams(max_tokens=2, prompt_logprobs=K),
                       use_tqdm=False)[0]
    check_prompt_logprobs(out, hf_model, PROMPT, K)
    assert engine.kv_cache.prefix_hits == hits
    # a request that does not ask still reuses the cache
    llm.generate({"prompt_token_ids": PROMPT}, SamplingParams(max_tokens=1), use_tqdm=False)
    assert engine.kv_cache.prefix_hits > hits


def test_n_samples_share_one_prompt_logprobs(checkpoint_factory):
    folder, hf_model = checkpoint_factory("llama")
    out = _llm(folder).generate({"prompt_token_ids": PROMPT},
                                SamplingParams(n=3, max_tokens=2, seed=1, prompt_logprobs=2), use_tqdm=False)[0]
    assert len(out.outputs) == 3
    check_prompt_logprobs(out, hf_model, PROMPT, 2)


def test_preemption_in_the_middle_of_the_prompt_keeps_entries_whole_and_unrepeated(checkpoint_factory):
    """Three short requests decoding long, then a long prompt that asks, in a pool of 12 blocks of
    4 with a budget of 4 tokens: the long prompt is preempted between its chunks and sent again
    from the first entry it lacks; each entry comes exactly once and equals transformers'."""
    folder, hf_model = checkpoint_factory("llama")
    probe = LLMEngine.from_kwargs(model=folder, skip_tokenizer_init=True, dtype="float32", kv_cache_memory=1 << 16,
                                  block_size=4)
    memory = 12 * kv_bytes_per_block(probe.model_config, 4, torch.float32)
    engine = LLMEngine.from_kwargs(model=folder, skip_tokenizer_init=True, dtype="float32", kv_cache_memory=memory,
                                   block_size=4, scheduler_policy="paged", max_num_seqs=6, max_num_batched_tokens=4,
                                   enable_prefix_caching=True)
    sent_from: list[int] = []
    build = engine.messages.build

    def spy(batch):
        msg = build(batch)
        sent_from.extend(r.prompt_logprobs_from for r in msg.requests
                         if isinstance(r, NewRequestData) and r.request_id == "long")
        return msg

    engine.messages.build = spy
    for i in range(3):
        engine.add_request(f"s{i}", {"prompt_token_ids": [7 + i, 8, 9]},
                           SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True))
    engine.add_request("long", {"prompt_token_ids": PROMPT},
                       SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, prompt_logprobs=K))
    done: dict[str, RequestOutput] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    assert engine.scheduler.num_preemptions > 0
    assert any(1 < f < len(PROMPT) for f in sent_from[1:]), sent_from  # resumed mid-prompt
    check_prompt_logprobs(done["long"], hf_model, PROMPT, K)


@pytest.mark.parametrize("bad", [-1, 21, True, 1.5])
def test_out_of_range_prompt_logprobs_is_refused(bad):
    with pytest.raises(SamplingParamsError) as err:
        SamplingParams(prompt_logprobs=bad)
    assert err.value.param == "prompt_logprobs"


def test_a_recomputed_chunk_keeps_the_entries_held_and_appends_only_new_ones():
    import numpy as np

    from orcinus.engine.output_processor import OutputProcessor
    from orcinus.executor.messages import PromptLogprobsChunk
    from orcinus.request import Request

    req = Request("r", [7, 8, 9, 10, 11], SamplingParams(prompt_logprobs=1), prompt_logprobs=[None])

    def chunk(start: int, values: list[float]) -> PromptLogprobsChunk:
        m = len(values)
        return PromptLogprobsChunk(start, np.asarray(values, dtype=np.float32), np.full(m, 2),
                                   np.full((m, 1), 3), np.zeros((m, 1), dtype=np.float32))

    OutputProcessor.append_prompt_logprobs(req, chunk(1, [-1.0, -2.0]))
    OutputProcessor.append_prompt_logprobs(req, chunk(2, [-9.0, -3.0]))  # token 2 again: the first value stays
    assert [e[t].logprob for e, t in zip(req.prompt_logprobs[1:], [8, 9, 10])] == [-1.0, -2.0, -3.0]
    assert req.prompt_logprobs[1][3].rank == 1 and req.prompt_logprobs[1][8].rank == 2
    assert req.needs_prompt_logprobs
    with pytest.raises(AssertionError):  # a hole would misalign the list with the prompt
        OutputProcessor.append_prompt_logprobs(req, chunk(5, [-1.0]))
