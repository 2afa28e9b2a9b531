"""Tool-call parsers on recorded model texts: what each format's models write, calls and the
content around them; texts that are not calls stay content."""
from __future__ import annotations

import json

import pytest

from orcinus.tools.parsers import get_parser, parser_names

TOOLS = ["get_weather", "get_time"]


def _calls(parser: str, text: str):
    parsed = get_parser(parser, TOOLS).parse(text)
    return parsed.content, [(c.name, json.loads(c.arguments)) for c in parsed.calls]


def test_registry() -> None:
    assert {"hermes", "llama3_json", "json"} <= set(parser_names())
    with pytest.raises(ValueError, match="unknown tool-call parser"):
        get_parser("nope", TOOLS)


def test_hermes() -> None:
    # Qwen2.5-7B-Instruct, recorded
    text = ('Let me check both.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_time", "arguments": {"tz": "CET"}}\n</tool_call>')
    assert _calls("hermes", text) == ("Let me check both.", [("get_weather", {"city": "Paris"}),
                                                             ("get_time", {"tz": "CET"})])
    # cut off before the closing tag (max_tokens after the JSON): still one call
    assert _calls("hermes", '<tool_call>{"name": "get_time", "arguments": {"tz": "UTC"}}')[1] == \
        [("get_time", {"tz": "UTC"})]
    assert _calls("hermes", "Paris is sunny.") == ("Paris is sunny.", [])
    # only the blanks before the tag go: a stream sends leading text before it knows a call follows
    assert _calls("hermes", '  Sure.\n<tool_call>{"name": "get_time", "arguments": {}}</tool_call>')[0] == "  Sure."
    # an unknown function or broken JSON: the text is returned as content, nothing invented
    for text in ('<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>', '<tool_call>{"name": </tool_call>'):
        assert _calls("hermes", text) == (text, [])


def test_llama3_json() -> None:
    # Llama-3.1-8B-Instruct, recorded: parameters, optional python tag, ';' between calls
    assert _calls("llama3_json", '{"name": "get_weather", "parameters": {"city": "Oslo"}}') == \
        (None, [("get_weather", {"city": "Oslo"})])
    assert _calls("llama3_json", '<|python_tag|>{"name": "get_time", "parameters": {"tz": "UTC"}}; '
                                 '{"name": "get_weather", "parameters": {"city": "Rome"}}')[1] == \
        [("get_time", {"tz": "UTC"}), ("get_weather", {"city": "Rome"})]
    assert _calls("llama3_json", "The weather is fine.") == ("The weather is fine.", [])
    text = '{"name": "get_time", "parameters": {"tz": "UTC"}} and then some prose'
    assert _calls("llama3_json", text) == (text, [])


def test_generic_json() -> None:
    # SmolLM2-135M-Instruct with the generic instructions, recorded
    assert _calls("json", '{"name": "get_weather", "arguments": {"city": "Paris"}}') == \
        (None, [("get_weather", {"city": "Paris"})])
    assert _calls("json", '```json\n[{"name": "get_time", "arguments": {"tz": "UTC"}}, '
                          '{"name": "get_weather", "arguments": "{\\"city\\": \\"Rome\\"}"}]\n```')[1] == \
        [("get_time", {"tz": "UTC"}), ("get_weather", {"city": "Rome"})]
    assert _calls("json", '{"tool_calls": [{"name": "get_time", "parameters": {"tz": "EST"}}]}')[1] == \
        [("get_time", {"tz": "EST"})]
    for text in ("Sure! The weather in Paris is sunny.", '{"city": "Paris"}', '{"name": "other", "arguments": {}}'):
        assert _calls("json", text) == (text, [])


def test_call_ids_are_unique() -> None:
    parsed = get_parser("json", TOOLS).parse('[{"name": "get_time", "arguments": {}}, {"name": "get_time", "arguments": {}}]')
    assert len({c.id for c in parsed.calls}) == 2 and all(c.id.startswith("call_") for c in parsed.calls)
