"""Llama 3.x JSON format: an optional <|python_tag|>, then {"name": ..., "parameters": {...}},
several separated by ';'."""
from __future__ import annotations

from orcinus.tools.parsers.base import ParsedCalls, Snapshot, ToolCallParser, call_prefix, held_tag, json_values
from orcinus.tools.parsers.partial_json import Invalid, parse

_TAG = "<|python_tag|>"


class Llama3JsonParser(ToolCallParser):
    name = "llama3_json"

    def parse(self, text: str) -> ParsedCalls:
        body = text.replace(_TAG, "").strip()
        if not body.startswith("{"):
            return ParsedCalls(text, [])
        values = json_values(body)
        calls = []
        for start, end, value in values:
            call = self.call_from(value, "parameters", "arguments")
            if call is None:
                return ParsedCalls(text, [])
            calls.append(call)
        # only separators may sit between the calls
        leftover = "".join(body[e:s] for (_, e, _), (s, _, _) in zip(values, values[1:]))
        rest = body[values[-1][1]:] if values else body
        if not calls or leftover.replace(";", "").strip() or rest.strip(" ;\n"):
            return ParsedCalls(text, [])
        return ParsedCalls(None, calls)

    def snapshot(self, text: str) -> Snapshot:
        body = text[:len(text) - held_tag(text, _TAG)].replace(_TAG, "").lstrip()
        if not body:
            return Snapshot()
        if not body.startswith("{"):
            return Snapshot(text)  # prose: no continuation makes it a call
        snap, i = Snapshot(), 0
        try:
            while i < len(body):
                node = parse(body, i)
                call = call_prefix(self, node, "parameters", "arguments") if node is not None else None
                if call is None:
                    break
                snap.calls.append(call)
                if not node.complete:
                    break
                i = node.end
                while i < len(body) and body[i] in " \t\n\r;":
                    i += 1
                if i < len(body) and body[i] != "{":
                    raise Invalid("only ';' and blanks between calls")
        except Invalid:
            return Snapshot(text)
        return snap
