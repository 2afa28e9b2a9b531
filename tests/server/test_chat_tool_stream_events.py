"""The chat stream with tools on a scripted engine output (a hermes model's recorded text, which
the default model does not write): each choice's chunks assemble to the whole response built
from the same final outputs, calls start before the choice ends, and a choice that writes prose
streams it as content."""
from __future__ import annotations

import asyncio
import json
import random

from orcinus.request import CompletionOutput, RequestOutput
from orcinus.server.chat_tools import plan_tools
from orcinus.server.protocol import ChatCompletionRequest, UsageInfo
from orcinus.server.serving_chat import _ChatView

CALLS = ('I will look both up.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich", '
         '"unit": "celsius"}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"tz": "CET"}}\n</tool_call>')
PROSE = "It is sunny in Zürich, 21 °C."
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


class _Tracker:
    """Stands in for FinishedTracker: replays scripted outputs."""

    def __init__(self, outputs: list[RequestOutput]) -> None:
        self.outputs = outputs
        self.latest: RequestOutput | None = None

    @property
    def stream(self):
        async def gen():
            for out in self.outputs:
                yield out
        return gen()

    def see(self, out: RequestOutput) -> None:
        self.latest = out

    def usage(self) -> UsageInfo:
        return UsageInfo(prompt_tokens=1, completion_tokens=0, total_tokens=1)


def _script(texts: list[str], seed: int) -> list[RequestOutput]:
    """Cumulative outputs for n choices growing in token-sized pieces, then finishing."""
    rng = random.Random(seed)
    ends = [0] * len(texts)
    outs = []
    while True:
        outputs = []
        for i, text in enumerate(texts):
            ends[i] = min(len(text), ends[i] + rng.randint(1, 6))
            done = ends[i] == len(text)
            outputs.append(CompletionOutput(i, text[:ends[i]], list(range(ends[i])), None, None,
                                            "stop" if done else None))
        outs.append(RequestOutput("r", None, [1], outputs, all(o.finish_reason for o in outputs)))
        if outs[-1].finished:
            return outs


def _view(n: int) -> _ChatView:
    body = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], tools=[
        TOOL, {"type": "function", "function": {"name": "get_time"}}], n=n, stream=True)
    return _ChatView("m", "chatcmpl-1", 0, body, None, None, plan_tools(body, "hermes"))


async def _collect(view: _ChatView, tracker: _Tracker) -> list[dict]:
    return [json.loads(e[len("data: "):]) async for e in view.events(tracker)]


def test_hermes_choices_stream_as_the_whole_response_says() -> None:
    for seed in range(4):
        outs = _script([CALLS, PROSE], seed)
        chunks = asyncio.run(_collect(_view(2), _Tracker(outs)))
        whole = _view(2).response([outs[-1]], _Tracker(outs)).model_dump()
        got = {0: {"content": "", "calls": [], "reason": None, "tool_chunks": 0},
               1: {"content": "", "calls": [], "reason": None, "tool_chunks": 0}}
        for chunk in chunks:
            for c in chunk["choices"]:
                g = got[c["index"]]
                assert g["reason"] is None  # nothing after a choice's finishing chunk
                g["content"] += c["delta"].get("content") or ""
                for d in c["delta"].get("tool_calls", []):
                    if "id" in d:
                        assert d["type"] == "function" and d["index"] == len(g["calls"])
                        g["calls"].append({"name": d["function"]["name"], "arguments": ""})
                    g["calls"][d["index"]]["arguments"] += d["function"].get("arguments", "")
                    g["tool_chunks"] += 1
                g["reason"] = c["finish_reason"]
        for choice in whole["choices"]:
            g = got[choice["index"]]
            msg = choice["message"]
            assert g["content"] == (msg["content"] or "") and g["reason"] == choice["finish_reason"]
            assert g["calls"] == [{"name": t["function"]["name"], "arguments": t["function"]["arguments"]}
                                  for t in msg.get("tool_calls") or []]
        assert got[0]["reason"] == "tool_calls" and got[0]["content"] == "I will look both up."
        assert got[0]["tool_chunks"] > 4 and got[1]["content"] == PROSE and got[1]["reason"] == "stop"
