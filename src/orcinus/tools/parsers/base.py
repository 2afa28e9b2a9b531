"""What every tool-call parser returns, and helpers they share."""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable

from orcinus.tools.parsers.partial_json import Invalid, Node, dumps_prefix


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class Call:
    name: str
    arguments: str  # JSON text of the arguments object, as OpenAI sends it
    id: str = field(default_factory=new_call_id)


@dataclass
class ParsedCalls:
    content: str | None  # text outside the calls (None when there is none)
    calls: list[Call]


@dataclass
class Snapshot:
    """What a text that is still growing says for certain: a prefix of the finished text's
    content, and its calls so far as (name, prefix of the arguments string). A text that cannot
    be a call is all content; one that is undecided is held back (the empty snapshot)."""
    content: str = ""
    calls: list[tuple[str, str]] = field(default_factory=list)


class ToolCallParser:
    name = ""

    def __init__(self, tool_names: Iterable[str]) -> None:
        self.tool_names = set(tool_names)

    def parse(self, text: str) -> ParsedCalls:
        raise NotImplementedError

    def snapshot(self, text: str) -> Snapshot:
        """For streaming (tools/stream.py): what the unfinished text already says. Holding
        everything back is always correct; parsers say more."""
        return Snapshot()

    def call_from(self, obj: Any, *arg_keys: str) -> Call | None:
        """A call from {"name": ..., <arg key>: {...}} naming a listed tool, else None."""
        name = obj.get("name") if isinstance(obj, dict) else None
        if not isinstance(name, str) or name not in self.tool_names:  # a list as name is unhashable
            return None
        args = next((obj[k] for k in arg_keys if k in obj), {})
        if isinstance(args, str):  # some models write the arguments as JSON text already
            try:
                args = json.loads(args)
            except (ValueError, RecursionError):  # too deep is no call too
                return None
        if not isinstance(args, dict):
            return None
        return Call(obj["name"], json.dumps(args, ensure_ascii=False))


def held_tag(text: str, tag: str) -> int:
    """Length of the end of text that may be the start of tag (held back until it is known)."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


def json_values(text: str) -> list[tuple[int, int, Any]]:
    """Every top-level JSON object or array in text, as (start, end, value), left to right."""
    decoder = json.JSONDecoder()
    found, i = [], 0
    while i < len(text):
        if text[i] in "{[":
            try:
                value, end = decoder.raw_decode(text, i)
            except RecursionError:
                break  # too deep to be a call; trying every later bracket would cost quadratic time
            except ValueError:
                i += 1
                continue
            found.append((i, end, value))
            i = end
        else:
            i += 1
    return found


def call_prefix(parser: ToolCallParser, node: Node, *arg_keys: str) -> tuple[str, str] | None:
    """(name, certain prefix of the arguments) of a call object being written, as call_from
    will read it once complete; None while its name is unknown. Raises Invalid when it cannot
    become a call of a listed tool. Arguments are streamed only under the first key: a later
    first key would take precedence in call_from."""
    if node.kind != "object":
        raise Invalid("a call is an object")
    if node.complete:
        call = parser.call_from(node.value, *arg_keys)
        if call is None:
            raise Invalid("not a call of a listed tool")
        return call.name, call.arguments
    _, name = node.member("name")
    if name is None:
        return None  # other members first, or the name not begun
    if name.kind != "string":
        raise Invalid("a function name is a string")
    if not name.complete:
        if not any(t.startswith(name.value) for t in parser.tool_names):
            raise Invalid("no listed tool has this name")
        return None
    if name.value not in parser.tool_names:
        raise Invalid("not a listed tool")
    _, args = node.member(arg_keys[0])
    if args is None or args.kind == "string" and not args.complete:
        return name.value, ""  # not begun, or written as JSON text: known once complete
    if args.complete:
        value = args.value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                raise Invalid("arguments text is not JSON") from None
        if not isinstance(value, dict):
            raise Invalid("arguments are an object")
        return name.value, json.dumps(value, ensure_ascii=False)
    if args.kind != "object":
        raise Invalid("arguments are an object")
    return name.value, dumps_prefix(args)
