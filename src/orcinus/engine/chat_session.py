"""`orcinus chat`: an interactive terminal chat that streams tokens as iterations produce them.

Ctrl-C during a reply stops that reply and returns to the prompt (the engine aborts the request
and frees its KV blocks); Ctrl-C at the prompt only says how to quit; Ctrl-D or /exit quits.
On a terminal, input lines are edited and recalled with the arrow keys (the stdlib `readline`).
"""
from __future__ import annotations

import sys
from typing import TextIO

from orcinus.config import EngineConfig
from orcinus.engine.llm_engine import LLMEngine
from orcinus.sampling_params import SamplingParams

COMMANDS = {
    "/help": "show this list",
    "/reset": "forget the conversation so far (the system message stays)",
    "/exit": "quit (also /quit or Ctrl-D)",
}
INTERRUPTED = "[interrupted]"


def help_text() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name.ljust(width)}  {what}" for name, what in COMMANDS.items()]
    return "commands:\n" + "\n".join(lines) + "\nCtrl-C stops a reply; arrow keys edit and recall lines.\n"


def stream_reply(engine: LLMEngine, messages: list[dict], params: SamplingParams, out: TextIO) -> str:
    """Runs one chat turn, writing text to `out` as it is produced; returns the reply shown.

    On Ctrl-C the request is aborted, the engine is drained of it (no RUNNING request, no KV
    block left behind), "[interrupted]" is written and the partial reply is returned."""
    rid = engine.add_request(None, engine.tokenizer.chat_prompt(messages), params)
    shown = 0
    text = ""
    try:
        while True:
            for o in engine.step():
                if o.request_id != rid:
                    continue
                text = o.outputs[0].text
                out.write(text[shown:])
                out.flush()
                shown = len(text)
                if o.finished:
                    out.write("\n")
                    return text
            if not engine.has_unfinished_requests():
                return text
    except KeyboardInterrupt:
        # step() already aborted the batch it was waiting on if the interrupt landed there;
        # otherwise the request is still queued or in flight: abort it and let it come back.
        engine.abort_request(rid)
        while engine.has_unfinished_requests():
            if not engine.step() and engine.has_unfinished_requests():
                raise RuntimeError("the engine holds requests it can neither run nor return") from None
        out.write(f"\n{INTERRUPTED}\n")
        out.flush()
        return text[:shown]


def _enable_line_editing() -> None:
    """Arrow keys, history and Emacs-style editing for input(); absent on some platforms."""
    try:
        import readline  # noqa: F401  (importing it is what makes input() use it)
    except ImportError:
        pass


def _read_line(inp: TextIO, out: TextIO, interactive: bool) -> str | None:
    """One line of input, None at end of input."""
    if interactive and inp is sys.stdin and out is sys.stdout:
        try:
            return input("> ")
        except EOFError:
            out.write("\n")
            return None
    if interactive:
        out.write("> ")
        out.flush()
    line = inp.readline()
    return line if line else None


def run_interactive_chat(config: EngineConfig, params: SamplingParams | dict | None = None, system: str | None = None,
                         inp: TextIO = sys.stdin, out: TextIO = sys.stdout,
                         engine: LLMEngine | None = None) -> int:
    """The chat loop. `params`: SamplingParams, or only the fields the user set (the model's
    defaults fill the rest, as everywhere)."""
    engine = engine or LLMEngine(config)
    if engine.tokenizer is None:
        print("error: chat needs a tokenizer (do not pass --skip-tokenizer-init)", file=sys.stderr)
        return 2
    if not isinstance(params, SamplingParams):
        params = engine.default_sampling_params(**(params or {}))
    messages: list[dict] = [{"role": "system", "content": system}] if system else []
    interactive = inp.isatty()
    if interactive:
        _enable_line_editing()
        out.write("orcinus chat: type a message; /help for commands, /exit or Ctrl-D to quit\n")
    while True:
        try:
            line = _read_line(inp, out, interactive)
        except KeyboardInterrupt:
            out.write("\n(Ctrl-C stops a reply; to quit type /exit or press Ctrl-D)\n")
            continue
        if line is None:
            return 0
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            command = line.split()[0].lower()
            if command in ("/exit", "/quit"):
                return 0
            if command == "/reset":
                dropped = sum(1 for m in messages if m["role"] != "system")
                messages = messages[:1] if system else []
                out.write(f"[conversation reset: {dropped} message{'s' if dropped != 1 else ''} forgotten"
                          f"{', system message kept' if system else ''}]\n")
                continue
            if command == "/help":
                out.write(help_text())
                continue
            out.write(f"unknown command {command}; /help lists the commands\n")
            continue
        messages.append({"role": "user", "content": line})
        try:
            reply = stream_reply(engine, messages, params, out)
        except ValueError as exc:  # e.g. the conversation no longer fits the context
            messages.pop()
            out.write(f"error: {exc}\n")
            continue
        messages.append({"role": "assistant", "content": reply})
