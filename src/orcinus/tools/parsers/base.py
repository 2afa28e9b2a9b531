"""What every tool-call parser returns, and helpers they share."""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable


@dataclass
class Call:
    name: str
    arguments: str  # JSON text of the arguments object, as OpenAI sends it
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")


@dataclass
class ParsedCalls:
    content: str | None  # text outside the calls (None when there is none)
    calls: list[Call]


class ToolCallParser:
    name = ""

    def __init__(self, tool_names: Iterable[str]) -> None:
        self.tool_names = set(tool_names)

    def parse(self, text: str) -> ParsedCalls:
        raise NotImplementedError

    def call_from(self, obj: Any, *arg_keys: str) -> Call | None:
        """A call from {"name": ..., <arg key>: {...}} naming a listed tool, else None."""
        if not isinstance(obj, dict) or obj.get("name") not in self.tool_names:
            return None
        args = next((obj[k] for k in arg_keys if k in obj), {})
        if isinstance(args, str):  # some models write the arguments as JSON text already
            try:
                args = json.loads(args)
            except ValueError:
                return None
        if not isinstance(args, dict):
            return None
        return Call(obj["name"], json.dumps(args, ensure_ascii=False))


def json_values(text: str) -> list[tuple[int, int, Any]]:
    """Every top-level JSON object or array in text, as (start, end, value), left to right."""
    decoder = json.JSONDecoder()
    found, i = [], 0
    while i < len(text):
        if text[i] in "{[":
            try:
                value, end = decoder.raw_decode(text, i)
            except ValueError:
                i += 1
                continue
            found.append((i, end, value))
            i = end
        else:
            i += 1
    return found
