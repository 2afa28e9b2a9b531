"""A tensor-parallel worker that dies fails the requests in flight with a clear error instead of
hanging the engine, and leaves no worker process behind; shutdown leaves none either."""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
from concurrent.futures import ThreadPoolExecutor

import pytest

from orcinus.config import EngineConfig
from orcinus.engine.llm_engine import LLMEngine
from orcinus.executor.executor import WorkerDied
from orcinus.sampling_params import SamplingParams

LIVENESS_S = 60  # only so that a regression fails instead of hanging CI; not a performance bound


def _engine(folder: str) -> LLMEngine:
    return LLMEngine(EngineConfig(model=folder, skip_tokenizer_init=True, dtype="float32", kv_cache_memory=1 << 22,
                                  block_size=4, tensor_parallel_size=2))


def _steps_until_error(engine: LLMEngine) -> BaseException | None:
    while engine.has_unfinished_requests():
        try:
            engine.step()
        except BaseException as exc:
            return exc
    return None


def test_killed_worker_fails_requests_cleanly_and_leaves_no_process(checkpoint_factory):
    folder, _ = checkpoint_factory("llama")
    engine = _engine(folder)
    pids = [p.pid for p in engine.executor._procs]
    engine.add_request("a", {"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=200, temperature=0.0,
                                                                           ignore_eos=True))
    engine.step()
    os.kill(pids[1], signal.SIGKILL)
    with ThreadPoolExecutor(1) as pool:
        error = pool.submit(_steps_until_error, engine).result(timeout=LIVENESS_S)
    assert isinstance(error, WorkerDied)
    assert f"worker 1 (pid {pids[1]}) died" in str(error)
    assert engine.free_all_check() and not engine.has_unfinished_requests()
    assert not multiprocessing.active_children()  # the surviving rank was stopped too
    # Later requests fail at once with the same explanation rather than hang.
    engine.add_request("b", {"prompt_token_ids": [5]}, SamplingParams(max_tokens=2))
    with pytest.raises(WorkerDied, match="died"):
        engine.step()
    assert engine.free_all_check()


def test_shutdown_stops_every_worker(checkpoint_factory):
    folder, _ = checkpoint_factory("qwen2")
    engine = _engine(folder)
    procs = list(engine.executor._procs)
    assert all(p.is_alive() for p in procs)
    engine.shutdown()
    engine.shutdown()  # idempotent
    assert not any(p.is_alive() for p in procs) and not multiprocessing.active_children()


def test_stopped_worker_ends_requests_with_an_error_and_the_engine_dies(checkpoint_factory):
    """Issue 19: with one worker stopped (SIGSTOP, as a stuck collective or a paused VM looks)
    every client hung for ever and requests were still accepted. Now no rank completing a layer
    for worker_stall_timeout_s ends the requests in flight with an error saying nothing about
    pids, /health turns bad, new requests are refused, and on_dead tells the server to exit."""
    import asyncio

    from orcinus.engine.async_engine import AsyncEngine, EngineUnavailable, GenerateRequest

    folder, _ = checkpoint_factory("llama")
    engine = LLMEngine(EngineConfig(model=folder, skip_tokenizer_init=True, dtype="float32", kv_cache_memory=1 << 22,
                                    block_size=4, tensor_parallel_size=2, worker_stall_timeout_s=12))
    pid = engine.executor._procs[1].pid
    dead: list[str] = []

    async def main():
        ae = AsyncEngine(engine, stall_timeout_s=2, on_dead=dead.append)
        ae.start()
        stream = await ae.submit([GenerateRequest("a", [5, 6, 7], SamplingParams(max_tokens=500, ignore_eos=True,
                                                                                 temperature=0.0))])
        seen: dict[str, object] = {}

        async def watch() -> None:
            # Between the stop and the executor giving up: /health is bad and new work is refused.
            while ae.health().ok:
                await asyncio.sleep(0.05)
            seen["health"] = ae.health()
            try:
                await ae.submit([GenerateRequest("late", [5], SamplingParams(max_tokens=2))])
            except EngineUnavailable as exc:
                seen["refused"] = str(exc)

        got = 0
        watcher = None
        with pytest.raises(EngineUnavailable) as err:
            async for _ in stream:
                got += 1
                if got == 2:
                    os.kill(pid, signal.SIGSTOP)
                    watcher = asyncio.create_task(watch())
        assert got >= 2 and watcher is not None
        await watcher
        with pytest.raises(EngineUnavailable):
            await ae.submit([GenerateRequest("later", [5], SamplingParams(max_tokens=2))])
        await ae.shutdown()
        return str(err.value), seen["health"], seen.get("refused")

    try:
        message, health, refused = asyncio.run(asyncio.wait_for(main(), LIVENESS_S * 5))
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    assert "worker process failed or stopped answering" in message
    assert "pid" not in message and str(pid) not in message and "exit code" not in message
    assert not health.ok and "made no progress" in health.reason and str(pid) not in health.reason
    assert refused is not None and "no progress" in refused
    assert dead and not multiprocessing.active_children()
