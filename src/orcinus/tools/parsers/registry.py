"""The parsers --tool-call-parser chooses from: a plain table, name -> class."""
from __future__ import annotations

from typing import Iterable

from orcinus.tools.parsers.base import ToolCallParser
from orcinus.tools.parsers.hermes import HermesParser
from orcinus.tools.parsers.json_generic import GenericJsonParser
from orcinus.tools.parsers.llama3_json import Llama3JsonParser

PARSERS: dict[str, type[ToolCallParser]] = {p.name: p for p in (GenericJsonParser, HermesParser, Llama3JsonParser)}


def parser_names() -> list[str]:
    return sorted(PARSERS)


def get_parser(name: str, tool_names: Iterable[str]) -> ToolCallParser:
    if name not in PARSERS:
        raise ValueError(f"unknown tool-call parser {name!r}; choose one of {', '.join(sorted(PARSERS))}")
    return PARSERS[name](tool_names)
