"""An error caused by one request fails that request only: the engine re-runs the failed batch
in isolation, aborts the culprit (its blocks freed) and the others' outputs are unchanged."""
from __future__ import annotations

import pytest

from orcinus.engine.llm_engine import EngineStepError, LLMEngine
from orcinus.executor.sampler import Sampler
from orcinus.sampling_params import SamplingParams

POISON_TOP_K = 7  # a parameter value the injected fault chokes on


class _ChokingSampler(Sampler):
    """Fails any batch holding a row with the poison setting, as a kernel would on a bad value."""

    def __call__(self, logits, meta):
        if any(s.top_k == POISON_TOP_K for s in meta.settings):
            raise ValueError("top_k=7 is not supported by this kernel")
        return super().__call__(logits, meta)


def _engine(folder: str) -> LLMEngine:
    engine = LLMEngine.from_kwargs(model=folder, skip_tokenizer_init=True, dtype="float32",
                                   kv_cache_memory=1 << 22, block_size=4)
    engine.executor.driver_worker.sampler = _ChokingSampler()
    return engine


PARAMS = {
    "greedy": SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True),
    "seeded": SamplingParams(max_tokens=6, temperature=1.0, seed=11, ignore_eos=True),
    "pair": SamplingParams(n=2, max_tokens=6, temperature=0.8, top_p=0.9, seed=5, ignore_eos=True),
}
PROMPTS = {"greedy": [5, 6, 7], "seeded": [9, 10, 11, 12], "pair": [13, 14], "culprit": [15, 16, 17]}


def _run(engine: LLMEngine, culprit_joins_at: int | None) -> tuple[dict, list[EngineStepError]]:
    for rid, params in PARAMS.items():
        engine.add_request(rid, {"prompt_token_ids": PROMPTS[rid]}, params)
    results, errors, it = {}, [], 0
    while engine.has_unfinished_requests() or it <= (culprit_joins_at or 0):
        if it == culprit_joins_at:
            engine.add_request("culprit", {"prompt_token_ids": PROMPTS["culprit"]},
                               SamplingParams(max_tokens=6, temperature=1.0, top_k=POISON_TOP_K))
        try:
            outs = engine.step()
        except EngineStepError as exc:
            errors.append(exc)
            outs = []
        for out in outs:
            if out.finished:
                results[out.request_id] = [o.token_ids for o in out.outputs]
        it += 1
    return results, errors


@pytest.mark.parametrize("joins_at", [0, 2])  # in the first batch, or while the others run
def test_only_the_culprit_fails_and_the_others_are_unchanged(joins_at, checkpoint_factory):
    folder, _ = checkpoint_factory("llama")
    clean, clean_errors = _run(_engine(folder), None)
    assert not clean_errors and set(clean) == set(PARAMS)
    engine = _engine(folder)
    results, errors = _run(engine, joins_at)
    assert results == clean  # every other request, seeded sampling included, as if alone
    (error,) = errors
    assert error.request_ids == ["culprit"]
    assert "culprit" in str(error) and "top_k=7" in str(error)
    assert not any(rid in str(error) for rid in PARAMS)  # never reveals who else was in the batch
    assert engine.free_all_check() and not engine.has_unfinished_requests()
    assert len(engine.executor.driver_worker.states) == 0  # workers forgot every request
