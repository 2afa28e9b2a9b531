"""Hermes / Qwen format: <tool_call>{"name": ..., "arguments": {...}}</tool_call>, any number."""
from __future__ import annotations

import json
import re

from orcinus.tools.parsers.base import ParsedCalls, ToolCallParser

_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


class HermesParser(ToolCallParser):
    name = "hermes"

    def parse(self, text: str) -> ParsedCalls:
        if "<tool_call>" not in text:
            return ParsedCalls(text, [])
        calls = []
        for m in _CALL.finditer(text):
            try:
                call = self.call_from(json.loads(m.group(1)), "arguments", "parameters")
            except ValueError:
                call = None
            if call is None:
                return ParsedCalls(text, [])  # not a call we can honour: leave the text as it is
            calls.append(call)
        content = text[:text.index("<tool_call>")].strip()
        return ParsedCalls(content or None, calls)
