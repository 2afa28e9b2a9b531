"""The forward thread (`orcinus/executor/uniproc.py`): an in-process executor builds its worker
on it and runs every iteration on it, so the process's torch work has one thread (one OpenMP
team); when the engine shuts down the thread is gone. Executors whose workers live elsewhere are
built where the engine is."""
from __future__ import annotations

import threading

import pytest

from orcinus.executor import factory
from orcinus.config import EngineConfig
from orcinus.engine.llm_engine import LLMEngine
from orcinus.executor import worker as worker_module
from orcinus.sampling_params import SamplingParams


def forward_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("orcinus-forward")]


def test_the_model_loads_and_runs_on_the_forward_thread(checkpoint_factory, monkeypatch):
    folder, _ = checkpoint_factory("llama")
    loaded_on: list[threading.Thread] = []
    original_load = worker_module.load_model

    def load_model(*args, **kwargs):
        loaded_on.append(threading.current_thread())
        return original_load(*args, **kwargs)

    monkeypatch.setattr(worker_module, "load_model", load_model)
    before = set(forward_threads())
    engine = LLMEngine.from_kwargs(model=folder, dtype="float32", device="cpu", kv_cache_memory=1 << 22,
                                   skip_tokenizer_init=True)
    try:
        ran_on: list[threading.Thread] = []
        runner = engine.executor.driver_worker.runner
        original_forward = runner.forward_logits

        def forward(*args, **kwargs):
            ran_on.append(threading.current_thread())
            return original_forward(*args, **kwargs)

        runner.forward_logits = forward
        engine.add_request("r", {"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=3, temperature=0.0))
        while engine.has_unfinished_requests():
            engine.step()
        assert len(loaded_on) == 1 and loaded_on[0] is not threading.current_thread()
        assert loaded_on[0].name.startswith("orcinus-forward")
        assert ran_on and set(ran_on) == {loaded_on[0]}  # one thread did all of the torch work
        assert loaded_on[0] in set(forward_threads()) - before
    finally:
        engine.shutdown()
    assert not loaded_on[0].is_alive()  # shut down means joined


def test_a_model_that_fails_to_load_raises_and_leaves_no_thread(tmp_path):
    before = set(forward_threads())
    with pytest.raises(Exception) as caught:
        LLMEngine.from_kwargs(model=str(tmp_path / "no-such-model"), device="cpu", skip_tokenizer_init=True)
    assert "no-such-model" in str(caught.value)
    for thread in set(forward_threads()) - before:
        thread.join(timeout=10)
        assert not thread.is_alive()


def test_multiprocess_executors_are_built_where_the_engine_is(monkeypatch):
    built_on: list[threading.Thread] = []

    class Remote:
        """Stands for a multiprocess executor: its workers live in other processes."""

        def __init__(self, config) -> None:
            built_on.append(threading.current_thread())

    from orcinus.executor import multiproc

    monkeypatch.setattr(multiproc, "MultiprocExecutor", Remote)
    before = set(forward_threads())
    executor = factory.make_executor(EngineConfig(tensor_parallel_size=2))
    assert isinstance(executor, Remote)
    assert built_on == [threading.current_thread()]
    assert set(forward_threads()) == before  # no forward thread: its workers run elsewhere
