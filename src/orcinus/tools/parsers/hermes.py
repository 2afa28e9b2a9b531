"""Hermes / Qwen format: <tool_call>{"name": ..., "arguments": {...}}</tool_call>, any number."""
from __future__ import annotations

import json
import re

from orcinus.tools.parsers.base import ParsedCalls, Snapshot, ToolCallParser, call_prefix, held_tag
from orcinus.tools.parsers.partial_json import Invalid, parse, skip_ws

_OPEN, _CLOSE = "<tool_call>", "</tool_call>"
_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


class HermesParser(ToolCallParser):
    name = "hermes"

    def parse(self, text: str) -> ParsedCalls:
        if _OPEN not in text:
            return ParsedCalls(text, [])
        calls = []
        for m in _CALL.finditer(text):
            try:
                call = self.call_from(json.loads(m.group(1)), "arguments", "parameters")
            except (ValueError, RecursionError):  # too deep is no call too
                call = None
            if call is None:
                return ParsedCalls(text, [])  # not a call we can honour: leave the text as it is
            calls.append(call)
        # Only the blanks before the tag go: a text without calls keeps its own, and streaming
        # can send leading text before it knows whether a call follows.
        content = text[:text.index(_OPEN)].rstrip()
        return ParsedCalls(content or None, calls)

    def snapshot(self, text: str) -> Snapshot:
        start = text.find(_OPEN)
        if start < 0:  # text so far, less trailing blanks and what may begin a tag
            return Snapshot(text[:len(text) - held_tag(text, _OPEN)].rstrip())
        snap = Snapshot(text[:start].rstrip())
        try:
            while start >= 0:
                node = parse(text, start + len(_OPEN))
                call = call_prefix(self, node, "arguments", "parameters") if node is not None else None
                if call is None:
                    return snap
                snap.calls.append(call)
                if not node.complete:
                    return snap
                after = skip_ws(text, node.end)
                if not text.startswith(_CLOSE, after):
                    if _CLOSE.startswith(text[after:]):
                        return snap  # the closing tag on its way (or the text ends here)
                    raise Invalid("text after a call inside its tag")
                start = text.find(_OPEN, after + len(_CLOSE))  # text between calls is dropped
        except Invalid:
            return Snapshot(text)  # the whole text is content, as parse() will say
        return snap
