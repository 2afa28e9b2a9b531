"""The generic JSON form, for chat templates with no tool format of their own (the default
model's): the reply is {"name": ..., "arguments": {...}}, a list of such objects, or
{"tool_calls": [...]}, optionally inside a ```json fence. tool_prompt.py tells the model so."""
from __future__ import annotations

import json
import re
from typing import Any

from orcinus.tools.parsers.base import Call, ParsedCalls, Snapshot, ToolCallParser, call_prefix
from orcinus.tools.parsers.partial_json import Invalid, Node, parse, skip_ws

_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)
_KEYS = ("arguments", "parameters")


class GenericJsonParser(ToolCallParser):
    name = "json"

    def parse(self, text: str) -> ParsedCalls:
        body = text.strip()
        m = _FENCE.match(body)
        if m:
            body = m.group(1)
        try:
            value = json.loads(body)
        except (ValueError, RecursionError):  # too deep is no call too
            return ParsedCalls(text, [])
        calls = self._calls(value)
        return ParsedCalls(None, calls) if calls else ParsedCalls(text, [])

    def _calls(self, value: Any) -> list[Call]:
        if isinstance(value, dict) and isinstance(value.get("tool_calls"), list):
            value = value["tool_calls"]
        items = value if isinstance(value, list) else [value]
        calls = [self.call_from(v, *_KEYS) for v in items]
        return [] if not calls or any(c is None for c in calls) else calls

    def snapshot(self, text: str) -> Snapshot:
        i = skip_ws(text, 0)
        fenced = text.startswith("`", i)
        if fenced:
            head = text[i:i + 7]
            if len(head) < 7 and "```json".startswith(head) or "```".startswith(head):
                return Snapshot()  # the fence is still being written
            if not head.startswith("```"):
                return Snapshot(text)
            i += 7 if head == "```json" else 3
        try:
            node = parse(text, i)
            if node is None:
                return Snapshot()
            if node.kind not in ("object", "array"):
                raise Invalid("a call is an object or a list")
            if node.complete:
                calls = self._calls(node.value)
                if not calls:
                    raise Invalid("not calls of listed tools")
                rest = text[skip_ws(text, node.end):]
                if rest and not (fenced and (rest.startswith("```") and not rest[3:].strip()
                                             or "```".startswith(rest))):
                    raise Invalid("text after the calls")
                return Snapshot(calls=[(c.name, c.arguments) for c in calls])
            return Snapshot(calls=self._open_calls(node))
        except Invalid:
            return Snapshot(text)

    def _open_calls(self, node: Node) -> list[tuple[str, str]]:
        """The calls of an open top-level value: one call, a list, or {"tool_calls": [...]}."""
        if node.kind == "object":
            first = node.children[0] if node.children else None
            if first is None:
                return []
            if first[0] == "tool_calls":
                if first[1] is None:
                    return []
                if first[1].kind == "array":
                    node = first[1]
            if node.kind == "object":
                call = call_prefix(self, node, *_KEYS)
                return [call] if call else []
            if node.complete:  # the list of {"tool_calls": [...]}, other members still coming
                calls = self._calls(node.value)
                if not calls:
                    raise Invalid("not calls of listed tools")
                return [(c.name, c.arguments) for c in calls]
        calls = []
        for item in node.children:
            call = call_prefix(self, item, *_KEYS)
            if call is None:
                break
            calls.append(call)
            if not item.complete:
                break
        return calls
