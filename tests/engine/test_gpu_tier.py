"""The GPU tier: runs wherever CUDA is present, skips elsewhere (see tests/conftest.py).

Every CPU path is covered without it; this tier adds what only a GPU shows: each attention
backend on CUDA, and bfloat16 (the CUDA default dtype) against transformers within a tolerance.
"""
from __future__ import annotations

import pytest
import torch

from orcinus.engine.llm_engine import LLMEngine
from orcinus.sampling_params import SamplingParams
from references import reference_logprobs

pytestmark = pytest.mark.gpu

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


def _run_capturing(engine: LLMEngine, prompts: list[list[int]]) -> tuple[dict[str, list[int]], list]:
    """All prompts join at once (initiations and increments share iterations); returns each
    request's tokens and, per iteration, (request ids, logits on the CPU in float32)."""
    captured: list[torch.Tensor] = []
    original = engine.executor.driver_worker.runner.forward_logits

    def wrapped(inp):
        out = original(inp)
        captured.append(out.detach().float().cpu())
        return out

    engine.executor.driver_worker.runner.forward_logits = wrapped
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", {"prompt_token_ids": p}, GREEDY)
    batches, done = [], {}
    while engine.has_unfinished_requests():
        batches.append([r.request_id for r in engine.scheduler.pool.values()])
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    assert engine.free_all_check()
    return done, list(zip(batches, captured))


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(3, 320, (n,), generator=g).tolist() for n in (5, 37, 12, 1)]


@pytest.mark.parametrize("backend", ["reference", "batched", "auto"])
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen3", "gpt2", "opt"])
def test_every_backend_on_cuda_matches_transformers(backend: str, arch: str, checkpoint_factory) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32 here
    folder, hf_model = checkpoint_factory(arch)
    engine = LLMEngine.from_kwargs(model=folder, skip_tokenizer_init=True, dtype="float32", device="cuda",
                                   kv_cache_memory=1 << 22, block_size=8, attention_backend=backend)
    assert next(engine.executor.driver_worker.runner.model.parameters()).device.type == "cuda"
    prompts = _prompts()
    done, iterations = _run_capturing(engine, prompts)
    steps: dict[str, int] = {}
    for ids, logits in iterations:
        for row, rid in enumerate(ids):
            k = steps.get(rid, 0)
            steps[rid] = k + 1
            i = int(rid[1:])
            with torch.no_grad():
                ref = hf_model(torch.tensor([prompts[i] + done[rid][:k]])).logits[0, -1].float()
            torch.testing.assert_close(logits[row], ref, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt2"])
def test_bfloat16_on_cuda_is_close_to_transformers(arch: str, checkpoint_factory) -> None:
    folder, hf_model = checkpoint_factory(arch)
    engine = LLMEngine.from_kwargs(model=folder, skip_tokenizer_init=True, device="cuda", kv_cache_memory=1 << 22,
                                   block_size=8)  # dtype auto: bfloat16 on CUDA
    assert next(engine.executor.driver_worker.runner.model.parameters()).dtype == torch.bfloat16
    prompts = _prompts()
    done, iterations = _run_capturing(engine, prompts)
    first = {}
    for ids, logits in iterations:
        for row, rid in enumerate(ids):
            first.setdefault(rid, logits[row])
    for i, p in enumerate(prompts):
        ref = reference_logprobs(hf_model, p, done[f"r{i}"])[0]
        got = torch.log_softmax(first[f"r{i}"], -1)
        assert torch.nn.functional.cosine_similarity(got, ref, dim=0) > 0.999
        # bfloat16 keeps about 3 significant digits: a loose bound, far tighter than a wrong model
        assert (got.exp() - ref.exp()).abs().max() < 0.02
