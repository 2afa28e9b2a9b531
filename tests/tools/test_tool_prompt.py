"""Tools into the prompt: native templates get `tools` and structured history, others the generic
instructions, and history turns they can render."""
from __future__ import annotations

import json

from orcinus.tools.tool_choice import Function, calls_from_required, required_spec
from orcinus.tools.tool_prompt import render_messages, template_knows_tools

FN = [{"name": "get_time", "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}}}]
HISTORY = [
    {"role": "user", "content": "time?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": '{"tz": "UTC"}'}}]},
    {"role": "tool", "content": "12:00", "tool_call_id": "call_1"},
]


def test_generic_template_gets_instructions_and_flat_history() -> None:
    out = render_messages(HISTORY, FN, native=False)
    assert out[0]["role"] == "system" and "get_time" in out[0]["content"] and '"arguments"' in out[0]["content"]
    assert json.loads(out[2]["content"]) == {"name": "get_time", "arguments": {"tz": "UTC"}}
    assert out[3]["role"] == "user" and "12:00" in out[3]["content"]


def test_native_template_keeps_structure() -> None:
    out = render_messages(HISTORY, FN, native=True)
    assert out[1]["tool_calls"][0]["function"]["arguments"] == {"tz": "UTC"}
    assert out[2] == HISTORY[2]
    assert template_knows_tools("{% if tools %}...{% endif %}") and not template_knows_tools("{{ messages }}")


def test_required_spec_shape() -> None:
    spec = required_spec([Function("get_time", None, FN[0]["parameters"])], parallel=False)
    assert spec.json["maxItems"] == 1 and spec.json["minItems"] == 1
    assert [(c.name, json.loads(c.arguments)) for c in calls_from_required('[{"name": "get_time", "arguments": {"tz": "X"}}]')] \
        == [("get_time", {"tz": "X"})]
    assert calls_from_required('[{"name": "get_ti') == []
