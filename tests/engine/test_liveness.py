"""Liveness follows real progress (issue 19, finding 2).

/health used to answer 503 "no iteration has finished" through a long prefill (its chunks emit no
token), so a liveness probe would restart a healthy server. Now a completed iteration counts, and
inside one iteration every finished layer does (executor/progress.py). A fake clock stands in for
time: every layer "takes" a long while, and health is read from inside the forward pass."""
from __future__ import annotations

import asyncio
import types

import pytest

from orcinus.config import EngineConfig
from orcinus.engine import async_engine as async_engine_module
from orcinus.engine.async_engine import AsyncEngine, GenerateRequest
from orcinus.engine.llm_engine import LLMEngine
from orcinus.executor import progress as progress_module
from orcinus.sampling_params import SamplingParams

STALL_S = 30.0  # the configured stall timeout, on the fake clock


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    for module in (async_engine_module, progress_module):
        monkeypatch.setattr(module, "time", types.SimpleNamespace(monotonic=fake.monotonic))
    return fake


def _layers(engine: LLMEngine) -> list:
    model = engine.executor.driver_worker.runner.model
    return [layer for m in model.modules() if m.__class__.__name__ == "ModuleList" for layer in m]


def _run_with_slow_layers(engine: LLMEngine, clock: FakeClock, seconds_per_layer: float, prompt_len: int):
    """Every layer advances the clock (before the layer's own progress beat) and records health."""
    ae = AsyncEngine(engine, stall_timeout_s=STALL_S)
    seen: list[tuple[bool, str]] = []

    def slow(module, inputs):  # a pre-hook: runs before the layer, so before its beat
        clock.now += seconds_per_layer
        health = ae.health()
        seen.append((health.ok, health.reason))

    for layer in _layers(engine):
        layer.register_forward_pre_hook(slow)

    async def main():
        ae.start()
        params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
        outs = [o async for o in ae.generate("long", list(range(3, 3 + prompt_len)), params)]
        await ae.shutdown()
        return outs

    outs = asyncio.run(main())
    return outs, seen


def test_health_stays_ok_through_a_long_chunked_prefill(checkpoint_factory, clock) -> None:
    folder, _ = checkpoint_factory("llama")
    engine = LLMEngine(EngineConfig(model=folder, skip_tokenizer_init=True, max_num_batched_tokens=8,
                                    kv_cache_memory=1 << 22, block_size=4))
    # 200 prompt tokens in chunks of 8: 25 iterations without a token, 2 layers x 12 s each, so
    # 600 fake seconds of prefill against a 30 s stall timeout.
    outs, seen = _run_with_slow_layers(engine, clock, 12.0, 200)
    assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 2
    assert len(seen) >= 2 * 25
    assert all(ok for ok, _ in seen), next(reason for ok, reason in seen if not ok)


def test_health_stays_ok_through_one_long_iteration(checkpoint_factory, clock) -> None:
    """One iteration longer than the stall timeout, each of its layers shorter: still healthy."""
    folder, _ = checkpoint_factory("llama")
    engine = LLMEngine(EngineConfig(model=folder, skip_tokenizer_init=True, kv_cache_memory=1 << 22, block_size=4))
    outs, seen = _run_with_slow_layers(engine, clock, 0.8 * STALL_S, 60)
    assert outs[-1].finished
    assert all(ok for ok, _ in seen), next(reason for ok, reason in seen if not ok)


def test_health_turns_bad_when_a_layer_takes_longer_than_the_timeout(checkpoint_factory, clock) -> None:
    folder, _ = checkpoint_factory("llama")
    engine = LLMEngine(EngineConfig(model=folder, skip_tokenizer_init=True, kv_cache_memory=1 << 22, block_size=4))
    _, seen = _run_with_slow_layers(engine, clock, 1.5 * STALL_S, 10)
    assert not all(ok for ok, _ in seen)
    assert any("made no progress" in reason for ok, reason in seen if not ok)
