"""AsyncEngine in-process, on a tiny random-weight checkpoint (token-id prompts, no tokenizer):
streaming, validation before streaming, aborts, the waiting bound, failures, health, shutdown."""
from __future__ import annotations

import asyncio
import threading
import time
from typing import Callable

import pytest

from orcinus.config import EngineConfig
from orcinus.engine.async_engine import (AsyncEngine, EngineStepError, EngineUnavailable, GenerateRequest,
                                         QueueFull)
from orcinus.engine.llm_engine import LLMEngine
from orcinus.request import RequestRejected
from orcinus.sampling_params import SamplingParams

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture
def engine(checkpoint_factory) -> LLMEngine:
    folder, _ = checkpoint_factory("llama")
    return LLMEngine(EngineConfig(model=folder, skip_tokenizer_init=True, max_num_seqs=4))


def gate_steps(engine: LLMEngine) -> threading.Event:
    """Make every iteration wait until the returned event is set (a stuck or paused engine)."""
    gate = threading.Event()
    step = engine.step

    def gated():
        gate.wait(30)
        return step()

    engine.step = gated
    return gate


async def eventually(predicate: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_generate_streams_every_iteration(engine: LLMEngine) -> None:
    # Each iteration waits until the consumer has taken the previous output, so none can coalesce
    # however the threads are scheduled: exactly one output per iteration must arrive.
    turn = threading.Semaphore(1)
    step = engine.step

    def paced():
        assert turn.acquire(timeout=30)
        return step()

    engine.step = paced

    async def main():
        ae = AsyncEngine(engine)
        ae.start()
        outs = []
        async for o in ae.generate("a", [1, 2, 3], SamplingParams(max_tokens=6, **GREEDY)):
            outs.append(o)
            turn.release()
        free = await ae.call(lambda e: e.free_all_check())
        thread = await ae.call(lambda e: threading.current_thread().name)
        await ae.shutdown()
        return outs, free, thread

    outs, free, thread = run(main())
    engine.step = step
    lengths = [len(o.outputs[0].token_ids) for o in outs]
    assert lengths == [1, 2, 3, 4, 5, 6]
    assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "length"
    assert not any(o.finished for o in outs[:-1])
    assert free and thread == "orcinus-engine"
    # The same tokens as driving the engine directly.
    engine.add_request("b", [1, 2, 3], SamplingParams(max_tokens=6, **GREEDY))
    direct = [o for _ in range(10) for o in engine.step() if o.finished]
    assert direct[0].outputs[0].token_ids == outs[-1].outputs[0].token_ids


def test_rejections_come_before_streaming_and_leave_nothing(engine: LLMEngine) -> None:
    async def main():
        ae = AsyncEngine(engine)
        ae.start()
        errors = []
        for prompt in ([1] * 600, [10**6], []):
            with pytest.raises(RequestRejected) as info:
                await ae.submit([GenerateRequest("x", prompt, SamplingParams(max_tokens=2))])
            errors.append(info.value.param)
        # All or nothing: a good request in a rejected batch is not left behind.
        with pytest.raises(RequestRejected):
            await ae.submit([GenerateRequest("good", [1, 2], SamplingParams(max_tokens=2)),
                             GenerateRequest("bad", [1], SamplingParams(max_tokens=10**6))])
        with pytest.raises(ValueError, match="no template"):
            def prompt():
                raise ValueError("no template")
            await ae.submit([GenerateRequest("c", prompt, SamplingParams())])
        stats = ae.stats()
        free = await ae.call(lambda e: e.free_all_check() and not e.has_unfinished_requests())
        await ae.shutdown()
        return errors, stats, free

    errors, stats, free = run(main())
    assert errors == ["prompt", "prompt", "prompt"]
    assert stats.num_waiting == 0 and stats.num_running == 0 and free


def test_closing_the_stream_aborts_and_frees_blocks(engine: LLMEngine) -> None:
    async def main():
        ae = AsyncEngine(engine)
        ae.start()
        gen = ae.generate("long", [1, 2, 3], SamplingParams(max_tokens=400, **GREEDY))
        first = await gen.__anext__()
        assert ae.stats().kv_cache_usage > 0
        await gen.aclose()  # what a client disconnect does
        assert await eventually(lambda: ae.stats().num_running == 0 and ae.stats().kv_cache_usage == 0)
        assert await ae.call(lambda e: not e.has_unfinished_requests())
        await ae.shutdown()
        return first

    assert not run(main()).finished


def test_waiting_bound(engine: LLMEngine) -> None:
    gate = gate_steps(engine)

    async def main():
        ae = AsyncEngine(engine, max_waiting_requests=2)
        ae.start()
        first = await ae.submit([GenerateRequest("a", [1, 2], SamplingParams(max_tokens=3, n=2, **GREEDY))])
        with pytest.raises(QueueFull):  # two sequences wait already
            await ae.submit([GenerateRequest("b", [1, 2], SamplingParams(max_tokens=3))])
        assert ae.num_waiting() == 2
        gate.set()
        outs = [o async for o in first]
        later = [o async for o in await ae.submit([GenerateRequest("b", [1, 2], SamplingParams(max_tokens=3))])]
        await ae.shutdown()
        return outs, later

    outs, later = run(main())
    assert outs[-1].finished and len(outs[-1].outputs) == 2 and later[-1].finished


def test_failed_iteration_fails_its_requests_but_not_the_server(engine: LLMEngine) -> None:
    step = engine.step
    calls = {"n": 0}

    def flaky():
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return step()

    engine.step = flaky

    async def main():
        ae = AsyncEngine(engine)
        ae.start()
        with pytest.raises(EngineStepError, match="RuntimeError"):
            async for _ in ae.generate("a", [1, 2], SamplingParams(max_tokens=3)):
                pass
        healthy = ae.health().ok
        outs = [o async for o in ae.generate("b", [1, 2], SamplingParams(max_tokens=3, **GREEDY))]
        free = await ae.call(lambda e: e.free_all_check())
        await ae.shutdown()
        return healthy, outs, free

    healthy, outs, free = run(main())
    assert healthy and outs[-1].finished and free


def test_repeated_failures_kill_the_loop(engine: LLMEngine) -> None:
    def broken():
        raise RuntimeError("broken")

    engine.step = broken

    async def main():
        ae = AsyncEngine(engine)
        ae.start()
        for i in range(3):
            with pytest.raises(EngineStepError):
                async for _ in ae.generate(f"r{i}", [1, 2], SamplingParams(max_tokens=3)):
                    pass
        assert await eventually(lambda: not ae.health().ok)
        with pytest.raises(EngineUnavailable):
            await ae.submit([GenerateRequest("late", [1], SamplingParams())])
        reason = ae.health().reason
        await ae.shutdown()
        return reason

    assert "3 iterations failed" in run(main())


def test_stuck_loop_is_unhealthy_until_it_moves(engine: LLMEngine) -> None:
    gate = gate_steps(engine)

    async def main():
        ae = AsyncEngine(engine, stall_timeout_s=0.3)
        ae.start()
        assert ae.health().ok
        stream = await ae.submit([GenerateRequest("a", [1, 2], SamplingParams(max_tokens=3, **GREEDY))])
        assert await eventually(lambda: not ae.health().ok)
        reason = ae.health().reason
        gate.set()
        outs = [o async for o in stream]
        assert await eventually(lambda: ae.health().ok)
        await ae.shutdown()
        return reason, outs

    reason, outs = run(main())
    assert "made no progress" in reason and outs[-1].finished


def test_shutdown_releases_waiting_callers(engine: LLMEngine) -> None:
    gate = gate_steps(engine)

    async def main():
        ae = AsyncEngine(engine)
        ae.start()
        stream = await ae.submit([GenerateRequest("a", [1, 2], SamplingParams(max_tokens=50, **GREEDY))])
        shutting = asyncio.create_task(ae.shutdown())
        await asyncio.sleep(0)
        gate.set()
        with pytest.raises(EngineUnavailable, match="shutting down"):
            async for _ in stream:
                pass
        await shutting
        with pytest.raises(EngineUnavailable):
            await ae.submit([GenerateRequest("b", [1], SamplingParams())])
        return ae

    ae = run(main())
    assert not ae.is_running and not ae.health().ok and engine.free_all_check()


def test_slow_prompt_preparation_does_not_hold_up_running_requests(engine: LLMEngine) -> None:
    release = threading.Event()

    def slow_prompt():  # e.g. tokenising a megabyte of text
        release.wait(30)
        return [1, 2, 3]

    async def main():
        ae = AsyncEngine(engine)
        ae.start()
        slow = asyncio.create_task(ae.submit([GenerateRequest("slow", slow_prompt, SamplingParams(max_tokens=2))]))
        outs = [o async for o in ae.generate("fast", [4, 5], SamplingParams(max_tokens=5, **GREEDY))]
        assert not slow.done()  # the fast request ran to its end while the slow one was prepared
        release.set()
        rest = [o async for o in await slow]
        await ae.shutdown()
        return outs, rest

    outs, rest = run(main())
    assert outs[-1].finished and rest[-1].finished


def test_a_loop_that_turns_without_progress_is_unhealthy(engine: LLMEngine) -> None:
    engine.step = lambda: []  # work is there, but no iteration ever produces anything

    async def main():
        ae = AsyncEngine(engine, stall_timeout_s=0.3)
        ae.start()
        await ae.submit([GenerateRequest("a", [1, 2], SamplingParams(max_tokens=3))])
        assert await eventually(lambda: not ae.health().ok)
        reason = ae.health().reason
        await ae.shutdown()
        return reason

    assert "made no progress" in run(main())
