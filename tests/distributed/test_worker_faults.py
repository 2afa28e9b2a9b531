"""A tensor-parallel worker that dies fails the requests in flight with a clear error instead of
hanging the engine, and leaves no worker process behind; shutdown leaves none either."""
from __future__ import annotations

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
