"""`orcinus chat`'s loop on the default model: commands, and Ctrl-C during a reply, which stops
that reply, leaves the engine consistent and returns to the prompt."""
from __future__ import annotations

import io

import pytest

from orcinus.config import EngineConfig
from orcinus.engine.chat_session import INTERRUPTED, run_interactive_chat
from orcinus.engine.llm_engine import LLMEngine
from orcinus.request import RequestState

QUESTION = "What is the capital of France?"
GREEDY = {"temperature": 0.0, "max_tokens": 24}


@pytest.fixture(scope="module")
def engine() -> LLMEngine:
    return LLMEngine(EngineConfig(dtype="float32", max_model_len=1024))


class RecordingInput(io.StringIO):
    """Input lines; records the engine's state each time the chat asks for the next line."""

    def __init__(self, text: str, engine: LLMEngine) -> None:
        super().__init__(text)
        self.engine = engine
        self.states: list[tuple[bool, int, bool]] = []

    def readline(self, *args) -> str:  # type: ignore[override]
        e = self.engine
        running = sum(1 for r in e.scheduler.pool.values() if r.state == RequestState.RUNNING)
        self.states.append((e.has_unfinished_requests(), running, e.free_all_check()))
        return super().readline(*args)


def _chat(engine: LLMEngine, text: str, system: str | None = None) -> tuple[int, str, RecordingInput]:
    inp, out = RecordingInput(text, engine), io.StringIO()
    code = run_interactive_chat(engine.config, dict(GREEDY), system, inp=inp, out=out, engine=engine)
    return code, out.getvalue(), inp


def test_ctrl_c_during_a_reply_stops_it_and_the_next_question_is_answered(engine: LLMEngine) -> None:
    original = engine.executor.driver_worker.execute
    calls = {"n": 0}

    def interrupted_once(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # the prompt and two tokens ran: the reply is under way
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    engine.executor.driver_worker.execute = interrupted_once
    try:
        code, shown, inp = _chat(engine, f"{QUESTION}\n{QUESTION}\n/exit\n")
    finally:
        engine.executor.driver_worker.execute = original
    assert code == 0
    first, _, rest = shown.partition(INTERRUPTED)
    assert rest, shown  # the first reply was cut off...
    assert "Paris" in rest  # ...and the second question got its whole answer
    # Each time the chat went back to the prompt: nothing queued or RUNNING, every block free.
    assert inp.states[1:] == [(False, 0, True)] * (len(inp.states) - 1)


def test_help_reset_and_unknown_commands(engine: LLMEngine) -> None:
    code, shown, _ = _chat(engine, f"/help\n{QUESTION}\n/reset\n/nonsense\n/exit\n", system="Be brief.")
    assert code == 0
    assert "/reset" in shown and "/exit" in shown and "/help" in shown
    assert "[conversation reset: 2 messages forgotten, system message kept]" in shown
    assert "unknown command /nonsense" in shown


def test_end_of_input_quits(engine: LLMEngine) -> None:
    code, shown, _ = _chat(engine, "")
    assert code == 0 and shown == ""
