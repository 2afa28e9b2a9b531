"""AsyncEngine in-process (tiny checkpoint, token-id prompts): what keeps one request from
hurting others at the engine's edge: parallel and cancellable prompt preparation, bounded
stream buffers, the waiting bound in sequences, and a dead engine that says so without ids."""
from __future__ import annotations

import asyncio
import threading

import pytest

from orcinus.config import EngineConfig
from orcinus.engine.async_engine import AsyncEngine, GenerateRequest, QueueFull
from orcinus.engine.llm_engine import LLMEngine
from orcinus.request import RequestRejected
from orcinus.sampling_params import SamplingParams

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture
def engine(checkpoint_factory) -> LLMEngine:
    folder, _ = checkpoint_factory("llama")
    return LLMEngine(EngineConfig(model=folder, skip_tokenizer_init=True, max_num_seqs=2))


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_a_short_prompt_is_not_held_up_by_a_long_preparation(engine: LLMEngine) -> None:
    """The long prompt's preparation finishes only after the short request has completed: with
    a single preparation thread this would never happen."""
    short_done = threading.Event()

    def long_prompt():
        assert short_done.wait(30), "the short request was held up behind the long preparation"
        return [1, 2, 3]

    async def main():
        ae = AsyncEngine(engine)
        ae.start()
        long_task = asyncio.ensure_future(ae.submit([GenerateRequest("long", long_prompt, SamplingParams(
            max_tokens=2, **GREEDY))]))
        await asyncio.sleep(0)  # the long preparation is queued first
        outs = [o async for o in ae.generate("short", lambda: [4, 5], SamplingParams(max_tokens=2, **GREEDY))]
        short_done.set()
        long_outs = [o async for o in await long_task]
        await ae.shutdown()
        return outs, long_outs

    outs, long_outs = run(main())
    assert outs[-1].finished and long_outs[-1].finished


def test_a_cancelled_caller_drops_its_queued_preparation(engine: LLMEngine) -> None:
    release = threading.Event()
    ran: list[str] = []

    def blocking(name: str):
        def prepare():
            ran.append(name)
            release.wait(30)
            return [1, 2]
        return prepare

    async def main():
        ae = AsyncEngine(engine, prepare_workers=1)
        ae.start()
        params = SamplingParams(max_tokens=1, **GREEDY)
        first = asyncio.ensure_future(ae.submit([GenerateRequest("first", blocking("first"), params)]))
        while not ran:
            await asyncio.sleep(0.01)
        queued = asyncio.ensure_future(ae.submit([GenerateRequest("queued", blocking("queued"), params)]))
        await asyncio.sleep(0.05)
        queued.cancel()  # its client went away while it waited for the preparation thread
        with pytest.raises(asyncio.CancelledError):
            await queued
        release.set()
        outs = [o async for o in await first]
        await asyncio.sleep(0.05)  # the thread would have taken the queued preparation by now
        stats = await ae.call(lambda e: (e.has_unfinished_requests(), e.free_all_check()))
        await ae.shutdown()
        return outs, stats

    outs, stats = run(main())
    assert outs[-1].finished and ran == ["first"] and stats == (False, True)


def test_a_consumer_that_stops_reading_holds_one_output_per_request(engine: LLMEngine) -> None:
    async def main():
        ae = AsyncEngine(engine)
        ae.start()
        stream = await ae.submit([GenerateRequest("a", [1, 2], SamplingParams(max_tokens=30, n=2, **GREEDY)),
                                  GenerateRequest("b", [3], SamplingParams(max_tokens=30, **GREEDY))])
        while not await ae.call(lambda e: not e.has_unfinished_requests()):
            assert stream.num_buffered <= 2 and ae.num_buffered_outputs() <= 2
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.05)  # the last outputs reach the event loop
        buffered = stream.num_buffered
        outs = [o async for o in stream]
        after = ae.num_buffered_outputs()
        await ae.shutdown()
        return buffered, outs, after

    buffered, outs, after = run(main())
    # Nothing was read while 30 iterations ran: only the final output of each request is left.
    assert buffered == 2 and [o.request_id for o in outs] == ["a", "b"] and all(o.finished for o in outs)
    assert [len(c.token_ids) for o in outs for c in o.outputs] == [30, 30, 30] and after == 0


def test_the_waiting_bound_counts_sequences(engine: LLMEngine) -> None:
    async def main():
        ae = AsyncEngine(engine, max_waiting_requests=4)
        ae.start()
        with pytest.raises(RequestRejected, match="sequences"):  # 5 could never wait in a bound of 4
            await ae.submit([GenerateRequest("p", [1], SamplingParams(n=5))])
        running = await ae.submit([GenerateRequest("r", [1], SamplingParams(max_tokens=400, n=2, **GREEDY))])
        while ae.stats().num_running < 2:  # both seats taken (max_num_seqs 2)
            await asyncio.sleep(0.01)
        waiting = await ae.submit([GenerateRequest("w", [1], SamplingParams(max_tokens=2, n=3, **GREEDY))])
        with pytest.raises(QueueFull):  # 3 waiting + 2 would pass the bound of 4
            await ae.submit([GenerateRequest("x", [1], SamplingParams(max_tokens=2, n=2, **GREEDY))])
        running.close()
        outs = [o async for o in waiting]
        await ae.shutdown()
        return outs

    outs = run(main())
    assert outs[-1].finished and len(outs[-1].outputs) == 3


def test_a_dead_engine_names_no_request_and_reports_it(engine: LLMEngine) -> None:
    reasons: list[str] = []

    def broken():
        raise RuntimeError("device lost while running secret-request-id")

    engine.step = broken

    async def main():
        ae = AsyncEngine(engine, on_dead=reasons.append)
        ae.start()
        messages = []
        for i in range(3):
            try:
                async for _ in ae.generate(f"secret-request-id-{i}", [1, 2], SamplingParams(max_tokens=2)):
                    pass
            except Exception as exc:
                messages.append(str(exc))
        while ae.is_running:
            await asyncio.sleep(0.01)
        health = ae.health()
        await ae.shutdown()
        return messages, health

    messages, health = run(main())
    assert len(messages) == 3 and not any("secret" in m for m in messages)
    assert not health.ok and health.reason.startswith("engine dead") and "secret" not in health.reason
    assert len(reasons) == 1 and "secret" not in reasons[0]
