"""tool_choice "required" and {"type": "function", ...} enforced with a grammar: the output is
then a valid call by construction, and is read back here without a parser.

named:    the output is the arguments object, valid against the function's parameters schema
required: the output is a JSON list of {"name": <a listed function>, "arguments": <valid for it>},
          one item at most when parallel_tool_calls is false"""
from __future__ import annotations

import json
from dataclasses import dataclass

from orcinus.structured.params import GrammarError, StructuredOutputsParams
from orcinus.tools.parsers.base import Call


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
    except ValueError:
        return []  # cut short by max_tokens: nothing complete to report
    return [Call(i["name"], json.dumps(i["arguments"], ensure_ascii=False)) for i in items]


def _normalised(text: str) -> str:
    try:
        return json.dumps(json.loads(text), ensure_ascii=False)
    except ValueError:
        return text  # cut short by max_tokens: the client sees what there is


def check_schema(fn: Function) -> None:
    if not isinstance(fn.parameters, dict):
        raise GrammarError(f"tools: the parameters of {fn.name!r} must be a JSON schema object", "tools")
