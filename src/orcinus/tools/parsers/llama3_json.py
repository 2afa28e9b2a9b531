"""Llama 3.x JSON format: an optional <|python_tag|>, then {"name": ..., "parameters": {...}},
several separated by ';'."""
from __future__ import annotations

from orcinus.tools.parsers.base import ParsedCalls, ToolCallParser, json_values


class Llama3JsonParser(ToolCallParser):
    name = "llama3_json"

    def parse(self, text: str) -> ParsedCalls:
        body = text.replace("<|python_tag|>", "").strip()
        if not body.startswith("{"):
            return ParsedCalls(text, [])
        values = json_values(body)
        calls = []
        rest = body
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
