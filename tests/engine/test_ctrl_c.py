"""Ctrl-C (KeyboardInterrupt) in the middle of an iteration: LLM.generate raises it at once and
the engine is left consistent (no RUNNING request, every KV block free) and keeps working."""
from __future__ import annotations

import signal
from typing import Callable

import pytest

from orcinus.engine.llm import LLM
from orcinus.request import RequestState
from orcinus.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=8)
PROMPTS = [{"prompt_token_ids": [5, 6, 7, 8]}, {"prompt_token_ids": [9, 10, 11]}, {"prompt_token_ids": [12, 13]}]


@pytest.fixture(scope="module")
def llm(checkpoint_factory) -> LLM:
    folder, _ = checkpoint_factory("llama")
    return LLM(folder, skip_tokenizer_init=True, dtype="float32", kv_cache_memory=1 << 22, block_size=4)


def assert_consistent(llm: LLM) -> None:
    engine = llm.engine
    assert not engine.has_unfinished_requests()
    assert not any(r.state == RequestState.RUNNING for r in engine.scheduler.pool.values())
    assert engine.scheduler.num_running == 0
    assert engine.free_all_check()


def _interrupt_on_call(target: object, name: str, call: int, how: Callable[[], None]) -> dict:
    """Replace target.name by a wrapper that calls `how` on its call-th call (which raises
    KeyboardInterrupt one way or another); returns the call counter."""
    original = getattr(target, name)
    seen = {"calls": 0}

    def wrapper(*args, **kwargs):
        seen["calls"] += 1
        if seen["calls"] == call:
            how()
        return original(*args, **kwargs)

    setattr(target, name, wrapper)
    seen["restore"] = lambda: setattr(target, name, original)
    return seen


def _raise() -> None:
    raise KeyboardInterrupt


def _sigint() -> None:
    # A real signal: Python's handler raises KeyboardInterrupt at the next bytecode boundary.
    signal.raise_signal(signal.SIGINT)


@pytest.mark.parametrize("where, how", [
    ("forward", _raise),  # the model's forward pass: surfaces while step() waits on the batch
    ("forward", _sigint),
    ("append_token", _raise),  # after the batch came back, while its tokens are appended
])
def test_interrupt_mid_iteration_raises_and_leaves_the_engine_consistent(llm: LLM, where: str, how) -> None:
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    reference = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    target, name = (llm.engine.executor.driver_worker, "execute") if where == "forward" else (llm.engine.outputs, "append_token")
    seen = _interrupt_on_call(target, name, 3, how)
    try:
        with pytest.raises(KeyboardInterrupt):
            llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    finally:
        seen["restore"]()
    # it stopped at the interrupt, mid-generation (8 tokens take more calls); a 4th call may be the
    # drops-only message that tells the worker to forget the aborted requests
    assert seen["calls"] in (3, 4)
    assert_consistent(llm)
    again = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    assert again == reference
    assert_consistent(llm)


def test_interrupt_with_two_batches_in_flight(checkpoint_factory) -> None:
    folder, _ = checkpoint_factory("llama")
    llm = LLM(folder, skip_tokenizer_init=True, dtype="float32", kv_cache_memory=1 << 22, block_size=4,
              n_workers=2, max_num_seqs=1)
    seen = _interrupt_on_call(llm.engine.executor.driver_worker, "execute", 4, _raise)
    try:
        with pytest.raises(KeyboardInterrupt):
            llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    finally:
        seen["restore"]()
    assert_consistent(llm)
    assert len(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == len(PROMPTS)
    assert_consistent(llm)
