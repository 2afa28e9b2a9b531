"""Tool-call parsers: a model's finished text -> (content, calls). One file per format."""
from orcinus.tools.parsers.base import ParsedCalls, ToolCallParser
from orcinus.tools.parsers.registry import get_parser, parser_names

__all__ = ["ParsedCalls", "ToolCallParser", "get_parser", "parser_names"]
