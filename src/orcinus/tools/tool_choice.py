"""tool_choice "required" and {"type": "function", ...} enforced with a grammar: the output is
then a valid call by construction, and is read back here without a parser.

named:    the output is the arguments object, valid against the function's parameters schema
required: the output is a JSON list of {"name": <a listed function>, "arguments": <valid for it>},
          one item at most when parallel_tool_calls is false"""
from __future__ import annotations

import json
from dataclasses import dataclass

from orcinus.structured.params import GrammarError, StructuredOutputsParams
from orcinus.tools.parsers.base import Call, Snapshot, ToolCallParser, call_prefix
from orcinus.tools.parsers.partial_json import Invalid, TooDeep, dumps_prefix, parse


@dataclass
class Function:
    name: str
    description: str | None
    parameters: dict  # a JSON schema; {} when the tool gave none


def _parameters(fn: Function) -> dict:
    return fn.parameters or {"type": "object"}


def named_spec(fn: Function) -> StructuredOutputsParams:
    return StructuredOutputsParams(json=_parameters(fn), param="tools")


def required_spec(functions: list[Function], parallel: bool) -> StructuredOutputsParams:
    item = {"anyOf": [{"type": "object", "properties": {"name": {"const": f.name}, "arguments": _parameters(f)},
                       "required": ["name", "arguments"], "additionalProperties": False} for f in functions]}
    schema: dict = {"type": "array", "items": item, "minItems": 1}
    if not parallel:
        schema["maxItems"] = 1
    return StructuredOutputsParams(json=schema, param="tools")


def calls_from_named(fn: Function, text: str) -> list[Call]:
    return [Call(fn.name, _normalised(text))]


def calls_from_required(text: str) -> list[Call]:
    try:
        items = json.loads(text)
    except (ValueError, RecursionError):  # too deep is no call too
        return []  # cut short by max_tokens: nothing complete to report
    return [Call(i["name"], json.dumps(i["arguments"], ensure_ascii=False)) for i in items]


def named_snapshot(fn: Function, text: str) -> Snapshot:
    """Streaming: the call is known from the first token; its arguments grow with the text."""
    try:
        return Snapshot(calls=[(fn.name, dumps_prefix(parse(text, 0)))])
    except (Invalid, TooDeep):  # hold the arguments for the final read
        return Snapshot(calls=[(fn.name, "")])


def required_snapshot(functions: list[Function], text: str) -> Snapshot:
    """Streaming: the list's items as they are written (the grammar keeps them valid)."""
    try:
        node = parse(text, 0)
        if node is None or node.complete or node.kind != "array":
            calls = calls_from_required(text) if node is not None and node.complete else []
            return Snapshot(calls=[(c.name, c.arguments) for c in calls])
        names = ToolCallParser(f.name for f in functions)
        snap = Snapshot()
        for item in node.children:
            call = call_prefix(names, item, "arguments")
            if call is None:
                break
            snap.calls.append(call)
        return snap
    except Invalid:
        return Snapshot()


def _normalised(text: str) -> str:
    try:
        return json.dumps(json.loads(text), ensure_ascii=False)
    except (ValueError, RecursionError):
        return text  # cut short by max_tokens: the client sees what there is


def check_schema(fn: Function) -> None:
    if not isinstance(fn.parameters, dict):
        raise GrammarError(f"tools: the parameters of {fn.name!r} must be a JSON schema object", "tools")
