"""The generic JSON form, for chat templates with no tool format of their own (the default
model's): the reply is {"name": ..., "arguments": {...}}, a list of such objects, or
{"tool_calls": [...]}, optionally inside a ```json fence. tool_prompt.py tells the model so."""
from __future__ import annotations

import json
import re

from orcinus.tools.parsers.base import ParsedCalls, ToolCallParser

_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


class GenericJsonParser(ToolCallParser):
    name = "json"

    def parse(self, text: str) -> ParsedCalls:
        body = text.strip()
        m = _FENCE.match(body)
        if m:
            body = m.group(1)
        try:
            value = json.loads(body)
        except ValueError:
            return ParsedCalls(text, [])
        if isinstance(value, dict) and isinstance(value.get("tool_calls"), list):
            value = value["tool_calls"]
        items = value if isinstance(value, list) else [value]
        calls = [self.call_from(v, "arguments", "parameters") for v in items]
        if not calls or any(c is None for c in calls):
            return ParsedCalls(text, [])
        return ParsedCalls(None, calls)
