"""Through the async engine, a request whose parameters make its iteration fail gets an error
naming only itself, while a concurrent request streams to the end with unchanged tokens."""
from __future__ import annotations

import asyncio

import pytest

from orcinus.config import EngineConfig
from orcinus.engine.async_engine import AsyncEngine, EngineStepError
from orcinus.engine.llm_engine import LLMEngine
from orcinus.executor.sampler import Sampler
from orcinus.sampling_params import SamplingParams

GREEDY = dict(temperature=0.0, ignore_eos=True)


class _ChokingSampler(Sampler):
    def __call__(self, logits, meta):
        if any(s.top_k == 7 for s in meta.settings):
            raise ValueError("top_k=7 is not supported by this kernel")
        return super().__call__(logits, meta)


def test_one_failing_request_does_not_fail_its_batch_mates(checkpoint_factory) -> None:
    folder, _ = checkpoint_factory("llama")
    engine = LLMEngine(EngineConfig(model=folder, skip_tokenizer_init=True, max_num_seqs=4))
    engine.executor.driver_worker.sampler = _ChokingSampler()

    async def main():
        ae = AsyncEngine(engine)
        ae.start()
        alone = [o async for o in ae.generate("solo", [1, 2, 3], SamplingParams(max_tokens=8, **GREEDY))]

        async def good():
            return [o async for o in ae.generate("good", [1, 2, 3], SamplingParams(max_tokens=8, **GREEDY))]

        async def bad():
            with pytest.raises(EngineStepError) as info:
                async for _ in ae.generate("bad", [4, 5], SamplingParams(max_tokens=8, top_k=7)):
                    pass
            return str(info.value)

        outs, message = await asyncio.gather(good(), bad())
        healthy = ae.health().ok
        free = await ae.call(lambda e: e.free_all_check())
        await ae.shutdown()
        return alone, outs, message, healthy, free

    alone, outs, message, healthy, free = asyncio.run(asyncio.wait_for(main(), 60))
    assert outs[-1].finished and outs[-1].outputs[0].token_ids == alone[-1].outputs[0].token_ids
    assert "bad" in message and "good" not in message
    assert healthy and free
