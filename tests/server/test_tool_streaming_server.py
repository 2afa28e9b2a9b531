"""Tool calls streamed through the real server and the official `openai` client: the deltas
assemble to the whole response's tool_calls (same names, same arguments strings), argument text
arrives in several chunks as it is generated, n > 1 choices stream independently with their
log-probs, and text that cannot be a call streams as content."""
from __future__ import annotations

import json

import openai
import pytest

from server_helpers import TIME, WEATHER

# auto with the default (generic JSON) parser, the reply held to the generic call form by a schema
GENERIC_CALL = {"type": "json_schema", "json_schema": {"name": "call", "schema": {
    "type": "object", "properties": {"name": {"const": "get_weather"},
                                     "arguments": WEATHER["function"]["parameters"]},
    "required": ["name", "arguments"], "additionalProperties": False}}}


def _streamed(client: openai.OpenAI, **kwargs) -> dict[int, dict]:
    """Per choice: content, calls [{id, name, arguments}], finish_reason, argument chunks, tokens."""
    out: dict[int, dict] = {}
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        for c in chunk.choices:
            s = out.setdefault(c.index, {"content": "", "calls": [], "reason": None, "arg_chunks": 0, "tokens": []})
            s["content"] += c.delta.content or ""
            for d in c.delta.tool_calls or []:
                if d.id is not None:  # a new call: id, type and name first, once
                    assert d.index == len(s["calls"]) and d.type == "function" and d.function.name
                    s["calls"].append({"id": d.id, "name": d.function.name, "arguments": ""})
                else:
                    assert d.function.name is None
                s["calls"][d.index]["arguments"] += d.function.arguments or ""
                s["arg_chunks"] += bool(d.function.arguments)
            if c.logprobs is not None and c.logprobs.content:
                s["tokens"] += [t.token for t in c.logprobs.content]
            s["reason"] = c.finish_reason or s["reason"]
    return out


def _calls(message) -> list[tuple[str, str]]:
    return [(c.function.name, c.function.arguments) for c in message.tool_calls or []]


def test_named_tool_choice_streams_arguments_as_generated(client: openai.OpenAI, model_name: str) -> None:
    kwargs = dict(model=model_name, messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER, TIME],
                  tool_choice={"type": "function", "function": {"name": "get_weather"}}, temperature=0, max_tokens=80)
    whole = client.chat.completions.create(**kwargs).choices[0]
    assert whole.finish_reason == "tool_calls"
    s = _streamed(client, **kwargs)[0]
    assert s["reason"] == "tool_calls" and s["content"] == ""
    assert [(c["name"], c["arguments"]) for c in s["calls"]] == _calls(whole.message)
    assert json.loads(s["calls"][0]["arguments"]) == json.loads(whole.message.tool_calls[0].function.arguments)
    assert s["arg_chunks"] > 1  # incremental, not one piece at the end


def test_required_n2_streams_each_choice_with_logprobs(client: openai.OpenAI, model_name: str) -> None:
    kwargs = dict(model=model_name, messages=[{"role": "user", "content": "Weather and time in Oslo?"}],
                  tools=[WEATHER, TIME], tool_choice="required", temperature=1.0, seed=21, max_tokens=120, n=2,
                  logprobs=True)
    whole = client.chat.completions.create(**kwargs)
    streamed = _streamed(client, **kwargs)
    assert sorted(streamed) == [0, 1]
    for choice in whole.choices:
        s = streamed[choice.index]
        assert choice.finish_reason == s["reason"] == "tool_calls"
        assert [(c["name"], c["arguments"]) for c in s["calls"]] == _calls(choice.message)
        assert s["arg_chunks"] > 1
        # every token's log-prob comes once, in the chunk of its text (or a chunk of its own)
        assert s["tokens"] == [t.token for t in choice.logprobs.content]


def test_auto_call_streams_with_the_generic_parser(client: openai.OpenAI, model_name: str) -> None:
    kwargs = dict(model=model_name, messages=[{"role": "user", "content": "What is the weather in Paris?"}],
                  tools=[WEATHER, TIME], response_format=GENERIC_CALL, temperature=0, max_tokens=80)
    whole = client.chat.completions.create(**kwargs).choices[0]
    assert whole.finish_reason == "tool_calls" and whole.message.content is None
    s = _streamed(client, **kwargs)[0]
    assert s["reason"] == "tool_calls" and s["content"] == ""
    assert [(c["name"], c["arguments"]) for c in s["calls"]] == _calls(whole.message)
    assert s["arg_chunks"] > 1


@pytest.mark.parametrize("parallel", [True, False])
def test_auto_prose_streams_as_content(client: openai.OpenAI, model_name: str, parallel: bool) -> None:
    # prose cannot be a generic JSON call: it goes out as content while it is generated
    kwargs = dict(model=model_name, messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER],
                  structured_outputs={"regex": r"The weather in Paris is [a-z]{3,12} and [a-z]{3,12}\."},
                  parallel_tool_calls=parallel, temperature=0, max_tokens=40)
    whole = client.chat.completions.create(**{k: v for k, v in kwargs.items() if k != "structured_outputs"},
                                           extra_body={"structured_outputs": kwargs["structured_outputs"]})
    content_chunks = 0
    text = ""
    for chunk in client.chat.completions.create(**{k: v for k, v in kwargs.items() if k != "structured_outputs"},
                                                extra_body={"structured_outputs": kwargs["structured_outputs"]},
                                                stream=True):
        for c in chunk.choices:
            assert not c.delta.tool_calls
            content_chunks += bool(c.delta.content)
            text += c.delta.content or ""
    assert text == whole.choices[0].message.content and whole.choices[0].message.tool_calls is None
    assert content_chunks > 1
