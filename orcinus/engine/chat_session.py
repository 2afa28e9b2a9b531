"""`orcinus chat`: an interactive terminal chat that streams tokens as iterations produce them."""
from __future__ import annotations

import sys
from typing import TextIO

from orcinus.config import EngineConfig
from orcinus.engine.llm_engine import LLMEngine
from orcinus.sampling_params import SamplingParams


def stream_reply(engine: LLMEngine, messages: list[dict], params: SamplingParams, out: TextIO) -> str:
    """Runs one chat turn, writing text to `out` as it is produced; returns the whole reply."""
    tok = engine.tokenizer
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
    rid = engine.add_request(None, {"prompt": prompt, "prompt_token_ids": tok.encode(prompt, add_special_tokens=False)},
                             params)
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
        engine.abort_request(rid)
        while engine.has_unfinished_requests():
            engine.step()
        out.write("\n[interrupted]\n")
        return text


def run_interactive_chat(config: EngineConfig, params: SamplingParams, system: str | None = None,
                         inp: TextIO = sys.stdin, out: TextIO = sys.stdout) -> int:
    engine = LLMEngine(config)
    if engine.tokenizer is None:
        print("error: chat needs a tokenizer (do not pass --skip-tokenizer-init)", file=sys.stderr)
        return 2
    messages: list[dict] = [{"role": "system", "content": system}] if system else []
    interactive = inp.isatty()
    if interactive:
        out.write("orcinus chat: type a message, /reset to start over, /exit or Ctrl-D to quit\n")
    while True:
        if interactive:
            out.write("> ")
            out.flush()
        line = inp.readline()
        if not line:
            return 0
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            messages = messages[:1] if system else []
            continue
        messages.append({"role": "user", "content": line})
        reply = stream_reply(engine, messages, params, out)
        messages.append({"role": "assistant", "content": reply})
