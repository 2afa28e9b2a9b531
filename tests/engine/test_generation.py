"""End-to-end greedy generation through the engine, against each request alone and transformers."""
from __future__ import annotations

import pytest
import torch

from orcinus.engine.llm import LLM
from orcinus.engine.llm_engine import LLMEngine
from orcinus.request import RequestRejected, RequestState
from orcinus.sampling_params import SamplingParams, SamplingParamsError
from references import ban_until, hf_generate_greedy, reference_greedy

GREEDY = dict(temperature=0.0, ignore_eos=True)


def _prompts(n: int, seed: int = 0, lo: int = 2, hi: int = 40) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi, (n,), generator=g).tolist()
    return [torch.randint(3, 320, (k,), generator=g).tolist() for k in lens]


def _run_staggered(engine: LLMEngine, prompts, max_new, arrive_at) -> dict[str, list[int]]:
    """Requests join at different iterations, as they would arrive at a server."""
    results: dict[str, list[int]] = {}
    it = 0
    while len(results) < len(prompts):
        for i, p in enumerate(prompts):
            if arrive_at[i] == it:
                engine.add_request(f"r{i}", {"prompt_token_ids": p}, SamplingParams(max_tokens=max_new[i], **GREEDY))
        for out in engine.step():
            if out.finished:
                results[out.request_id] = out.outputs[0].token_ids
        it += 1
        assert it < 2000
    return results


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt2", "opt"])
@pytest.mark.parametrize("policy", ["orca", "static"])
def test_staggered_mixed_batch_equals_alone_and_transformers(arch, policy, checkpoint_factory):
    folder, hf_model = checkpoint_factory(arch)
    prompts = _prompts(6, seed=3)
    max_new = [7, 3, 12, 1, 9, 5]
    arrive_at = [0, 0, 1, 2, 2, 6]
    engine = LLMEngine.from_kwargs(model=folder, skip_tokenizer_init=True, dtype="float32", device="cpu", kv_cache_memory=1 << 22,
                                   block_size=4, max_num_seqs=4, scheduler_policy=policy)
    together = _run_staggered(engine, prompts, max_new, arrive_at)
    assert engine.free_all_check()
    for i, p in enumerate(prompts):
        alone = LLMEngine.from_kwargs(model=folder, skip_tokenizer_init=True, dtype="float32", device="cpu", kv_cache_memory=1 << 22, block_size=4)
        assert _run_staggered(alone, [p], [max_new[i]], [0])["r0"] == together[f"r{i}"]
        assert together[f"r{i}"] == hf_generate_greedy(hf_model, p, max_new[i])


@pytest.mark.parametrize("n_workers", [2, 3])
def test_pipelined_batches_in_flight_give_the_same_tokens(n_workers, checkpoint_factory):
    folder, hf_model = checkpoint_factory("llama")
    prompts = _prompts(5, seed=4)
    params = [SamplingParams(max_tokens=m, **GREEDY) for m in (4, 8, 2, 6, 5)]
    llm = LLM(folder, skip_tokenizer_init=True, dtype="float32", device="cpu", kv_cache_memory=1 << 22, block_size=4, max_num_seqs=2,
              n_workers=n_workers)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for p, sp, out in zip(prompts, params, outs):
        assert out.outputs[0].token_ids == hf_generate_greedy(hf_model, p, sp.max_tokens)
    assert llm.engine.free_all_check()


def test_generate_returns_in_input_order_with_vllm_shaped_outputs(checkpoint_factory):
    folder, _ = checkpoint_factory("llama")
    llm = LLM(folder, skip_tokenizer_init=True, dtype="float32", device="cpu", kv_cache_memory=1 << 22, block_size=4, max_num_seqs=3)
    prompts = _prompts(7, seed=5)
    params = [SamplingParams(max_tokens=k + 1, **GREEDY) for k in range(7)]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for p, k, out in zip(prompts, range(7), outs):
        assert out.prompt_token_ids == p
        assert len(out.outputs[0].token_ids) == k + 1
        assert out.outputs[0].finish_reason == "length"
        assert out.finished


def test_kv_cache_too_small_and_context_overflow_are_rejected(checkpoint_factory):
    folder, _ = checkpoint_factory("llama")
    llm = LLM(folder, skip_tokenizer_init=True, dtype="float32", device="cpu", kv_cache_memory=4 * 2 * 2 * 2 * 16 * 4 * 4, block_size=4)
    slots = llm.engine.kv_cache.n_slots
    with pytest.raises(RequestRejected, match="KV cache"):
        llm.generate({"prompt_token_ids": [5] * 4}, SamplingParams(max_tokens=slots))
    with pytest.raises(RequestRejected, match="context length"):
        llm.generate({"prompt_token_ids": [5] * 600}, SamplingParams(max_tokens=1))
    with pytest.raises(RequestRejected, match="vocabulary"):
        llm.generate({"prompt_token_ids": [5, 99999]}, SamplingParams(max_tokens=1))
    with pytest.raises(RequestRejected, match="empty"):
        llm.generate({"prompt_token_ids": []}, SamplingParams(max_tokens=1))
    with pytest.raises(SamplingParamsError):
        SamplingParams(top_p=0)
    assert llm.engine.free_all_check()
    # the engine still works after the rejections
    out = llm.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=3, **GREEDY), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3


def test_bad_request_in_a_list_strands_nothing(checkpoint_factory):
    folder, _ = checkpoint_factory("llama")
    llm = LLM(folder, skip_tokenizer_init=True, dtype="float32", device="cpu", kv_cache_memory=1 << 22, block_size=4)
    with pytest.raises(RequestRejected):
        llm.generate([{"prompt_token_ids": [5, 6]}, {"prompt_token_ids": [5] * 700}], SamplingParams(max_tokens=2))
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.free_all_check()


def test_seeded_sampling_is_independent_of_batch_companions(checkpoint_factory):
    folder, _ = checkpoint_factory("llama")
    llm = LLM(folder, skip_tokenizer_init=True, dtype="float32", device="cpu", kv_cache_memory=1 << 22, block_size=4)
    p = {"prompt_token_ids": [5, 9, 11, 20]}
    seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=12, ignore_eos=True)
    alone = llm.generate(p, seeded, use_tqdm=False)[0].outputs[0].token_ids
    others = [{"prompt_token_ids": q} for q in _prompts(4, seed=9)]
    mixed = llm.generate(others[:2] + [p] + others[2:],
                         [SamplingParams(temperature=1.0, max_tokens=6, ignore_eos=True)] * 2 + [seeded]
                         + [SamplingParams(temperature=0.7, max_tokens=15, ignore_eos=True)] * 2, use_tqdm=False)
    assert mixed[2].outputs[0].token_ids == alone
    other_seed = llm.generate(p, SamplingParams(temperature=1.0, seed=99, max_tokens=12, ignore_eos=True),
                              use_tqdm=False)[0].outputs[0].token_ids
    assert other_seed != alone


def test_n_greater_than_one_gives_n_distinct_samples(checkpoint_factory):
    folder, _ = checkpoint_factory("llama")
    llm = LLM(folder, skip_tokenizer_init=True, dtype="float32", device="cpu", kv_cache_memory=1 << 22, block_size=4)
    out = llm.generate({"prompt_token_ids": [5, 9, 11]},
                       SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=10, ignore_eos=True), use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    assert all(len(c.token_ids) == 10 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    again = llm.generate({"prompt_token_ids": [5, 9, 11]},
                         SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=10, ignore_eos=True), use_tqdm=False)[0]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in out.outputs]
    assert llm.engine.free_all_check()


def test_stop_token_ids_min_tokens_and_logprobs(checkpoint_factory):
    folder, hf_model = checkpoint_factory("llama")
    llm = LLM(folder, skip_tokenizer_init=True, dtype="float32", device="cpu", kv_cache_memory=1 << 22, block_size=4)
    p = [5, 9, 11, 40, 2]
    free_run = llm.generate({"prompt_token_ids": p}, SamplingParams(max_tokens=8, **GREEDY), use_tqdm=False)[0]
    toks = free_run.outputs[0].token_ids
    stop_at = toks[3]
    first = toks.index(stop_at)
    out = llm.generate({"prompt_token_ids": p}, SamplingParams(max_tokens=8, stop_token_ids=[stop_at], **GREEDY),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == toks[:first + 1] and out.finish_reason == "stop" and out.stop_reason == stop_at
    # min_tokens: the stop token (greedy's very first choice) cannot be chosen before 4 tokens exist.
    held = llm.generate({"prompt_token_ids": p}, SamplingParams(max_tokens=8, min_tokens=4, stop_token_ids=[toks[0]],
                                                                **GREEDY), use_tqdm=False)[0].outputs[0]
    want = reference_greedy(hf_model, p, 8, ban_until((toks[0],), 4), stop_ids=(toks[0],))
    assert held.token_ids == want and len(want) >= 4 and toks[0] not in want[:4]
    assert llm.generate({"prompt_token_ids": p}, SamplingParams(max_tokens=8, stop_token_ids=[toks[0]], **GREEDY),
                        use_tqdm=False)[0].outputs[0].token_ids == toks[:1]  # without min_tokens it stops at once
    lp = llm.generate({"prompt_token_ids": p}, SamplingParams(max_tokens=3, logprobs=3, **GREEDY),
                      use_tqdm=False)[0].outputs[0]
    assert len(lp.logprobs) == 3
    with torch.no_grad():
        ref = torch.log_softmax(hf_model(torch.tensor([p])).logits[0, -1].float(), -1)
    top = torch.topk(ref, 3)
    got = lp.logprobs[0]
    assert lp.token_ids[0] in got
    for tid, val in zip(top.indices.tolist(), top.values.tolist()):
        assert abs(got[tid].logprob - val) < 1e-3


def test_checkpoint_without_tokenizer_serves_token_ids(checkpoint_factory):
    folder, _ = checkpoint_factory("qwen2")
    llm = LLM(folder, kv_cache_memory=1 << 22, block_size=4)  # no skip flag: found no tokenizer, goes on
    assert llm.get_tokenizer() is None
    out = llm.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=2, **GREEDY), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 2 and out[0].outputs[0].text == ""
    with pytest.raises(RequestRejected, match="token ids|prompt_token_ids"):
        llm.generate("some text", SamplingParams(max_tokens=2))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_runs_close_to_float32(dtype, checkpoint_factory):
    folder, hf_model = checkpoint_factory("llama")
    engine = LLMEngine.from_kwargs(model=folder, skip_tokenizer_init=True, kv_cache_memory=1 << 22, block_size=4,
                                   dtype=dtype)
    assert engine.executor.driver_worker.runner.kv_caches[0][0].dtype == getattr(torch, dtype)
    assert next(engine.executor.driver_worker.runner.model.parameters()).dtype == getattr(torch, dtype)
    captured = []
    original = engine.executor.driver_worker.runner.forward_logits
    engine.executor.driver_worker.runner.forward_logits = lambda inp: captured.append(original(inp)) or captured[-1]
    prompt = _prompts(1, seed=11, lo=20, hi=21)[0]
    engine.add_request("a", {"prompt_token_ids": prompt}, SamplingParams(max_tokens=1, **GREEDY))
    while engine.has_unfinished_requests():
        engine.step()
    with torch.no_grad():
        ref = hf_model(torch.tensor([prompt])).logits[0, -1]
    got = captured[0][0].cpu()
    cos = torch.nn.functional.cosine_similarity(got, ref, dim=0)
    assert cos > 0.999, cos
    assert (got - ref).abs().max() < 0.05 * ref.abs().max() + 0.05


def test_abort_mid_generation_frees_blocks_and_others_continue(checkpoint_factory):
    folder, hf_model = checkpoint_factory("llama")
    engine = LLMEngine.from_kwargs(model=folder, skip_tokenizer_init=True, dtype="float32", device="cpu", kv_cache_memory=1 << 22,
                                   block_size=4)
    p = _prompts(2, seed=12)
    engine.add_request("keep", {"prompt_token_ids": p[0]}, SamplingParams(max_tokens=10, **GREEDY))
    engine.add_request("drop", {"prompt_token_ids": p[1]}, SamplingParams(max_tokens=50, **GREEDY))
    engine.step()
    engine.step()
    used = engine.kv_cache.num_used_blocks
    drop = engine.scheduler.pool["drop"]
    emitted = len(drop.output_token_ids)
    # The next iteration was launched before step() returned, so "drop" is in flight: it leaves
    # when that batch returns, and the token computed for it there is discarded.
    assert drop.state == RequestState.RUNNING
    engine.abort_request("drop")
    assert engine.has_unfinished_requests()
    engine.step()
    assert engine.kv_cache.num_used_blocks < used and "drop" not in engine.scheduler.pool
    assert len(drop.output_token_ids) == emitted
    result = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id == "keep"
            if out.finished:
                result = out.outputs[0].token_ids
    assert result == hf_generate_greedy(hf_model, p[0], 10)
    assert engine.free_all_check()


def test_failed_iteration_aborts_its_requests_frees_blocks_and_engine_goes_on(checkpoint_factory):
    from orcinus.engine.llm_engine import EngineStepError

    folder, _ = checkpoint_factory("llama")
    engine = LLMEngine.from_kwargs(model=folder, skip_tokenizer_init=True, dtype="float32", device="cpu", kv_cache_memory=1 << 22,
                                   block_size=4)
    engine.add_request("a", {"prompt_token_ids": [5, 6, 7]}, SamplingParams(n=2, max_tokens=4, **GREEDY))
    original = engine.executor.driver_worker.execute
    engine.executor.driver_worker.execute = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom"))
    with pytest.raises(EngineStepError) as info:
        engine.step()
    assert info.value.request_ids == ["a"]
    assert engine.free_all_check() and not engine.has_unfinished_requests()
    engine.executor.driver_worker.execute = original
    engine.add_request("a", {"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=2, **GREEDY))  # id reusable
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.free_all_check()


@pytest.mark.parametrize("kwargs", [dict(temperature=float("nan")), dict(top_p=float("inf")), dict(seed=2 ** 70)])
def test_non_finite_and_out_of_range_sampling_values_are_refused(kwargs):
    with pytest.raises(SamplingParamsError):
        SamplingParams(**kwargs)
