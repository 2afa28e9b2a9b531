"""Tools on the chat endpoint: what tool_choice asks for, how the prompt and the constraint
follow from it, and how a finished text becomes message.tool_calls."""
from __future__ import annotations

from dataclasses import dataclass

from orcinus.server.errors import OpenAIError
from orcinus.server.protocol import ChatCompletionRequest
from orcinus.server.protocol_structured import DeltaFunctionCall, DeltaToolCall
from orcinus.structured.params import StructuredOutputsParams
from orcinus.tools import tool_choice as tc
from orcinus.tools.parsers import get_parser
from orcinus.tools.parsers.base import Call
from orcinus.tools.stream import StreamDelta, ToolCallStream


@dataclass
class ToolPlan:
    mode: str  # "auto" | "required" | "named"
    functions: list[tc.Function]
    named: tc.Function | None
    parser: str
    parallel: bool

    def spec(self) -> StructuredOutputsParams | None:
        if self.mode == "named":
            return tc.named_spec(self.named)
        if self.mode == "required":
            return tc.required_spec(self.functions, self.parallel)
        return None

    def prompt_functions(self) -> list[dict]:
        shown = [self.named] if self.mode == "named" else self.functions
        return [{"name": f.name, **({"description": f.description} if f.description else {}),
                 "parameters": f.parameters or {"type": "object"}} for f in shown]

    def extract(self, text: str) -> tuple[str | None, list[Call]]:
        """(content, calls) of a finished choice."""
        if self.mode == "named":
            return None, tc.calls_from_named(self.named, text)
        if self.mode == "required":
            calls = tc.calls_from_required(text)
            return (None, calls) if calls else (text, [])
        parsed = get_parser(self.parser, [f.name for f in self.functions]).parse(text)
        calls = parsed.calls if self.parallel else parsed.calls[:1]
        return parsed.content, calls

    def stream(self) -> ToolCallStream:
        """A choice's streaming reader; named and required know their format from the start."""
        if self.mode == "named":
            return ToolCallStream(lambda t: tc.named_snapshot(self.named, t), self.extract)
        if self.mode == "required":
            return ToolCallStream(lambda t: tc.required_snapshot(self.functions, t), self.extract)
        parser = get_parser(self.parser, [f.name for f in self.functions])
        return ToolCallStream(parser.snapshot, self.extract, None if self.parallel else 1)


def delta_tool_calls(delta: StreamDelta) -> list[DeltaToolCall] | None:
    """OpenAI's shape: id, type and name on a call's first delta, then arguments fragments."""
    if not delta.calls:
        return None
    return [DeltaToolCall(index=d.index, id=d.id, type="function" if d.name is not None else None,
                          function=DeltaFunctionCall(name=d.name, arguments=d.arguments))
            for d in delta.calls]


def plan_tools(body: ChatCompletionRequest, parser: str) -> ToolPlan | None:
    """None when the request neither offers tools nor asks for a call (tool_choice none is that too)."""
    choice = body.tool_choice
    if not body.tools:
        if choice is not None and choice not in ("none", "auto"):
            raise OpenAIError(400, "tool_choice asks for a tool call but the request lists no tools",
                              param="tool_choice")
        return None
    if choice == "none":
        return None
    functions = [tc.Function(t.function.name, t.function.description, t.function.parameters or {})
                 for t in body.tools]
    names = [f.name for f in functions]
    if len(set(names)) != len(names):
        raise OpenAIError(400, "tools: function names must be unique", param="tools")
    parallel = body.parallel_tool_calls is not False
    if choice is None or choice == "auto":
        return ToolPlan("auto", functions, None, parser, parallel)
    if choice == "required":
        plan = ToolPlan("required", functions, None, parser, parallel)
    else:
        named = next((f for f in functions if f.name == choice.function.name), None)
        if named is None:
            raise OpenAIError(400, f"tool_choice names the function {choice.function.name!r}, which is not in "
                                   f"tools ({', '.join(names)})", param="tool_choice")
        plan = ToolPlan("named", functions, named, parser, parallel)
    if body.structured_outputs is not None or (body.response_format is not None and body.response_format.type != "text") \
            or any(getattr(body, f) is not None for f in ("guided_json", "guided_regex", "guided_choice", "guided_grammar")):
        raise OpenAIError(400, f"tool_choice {'required' if plan.mode == 'required' else 'naming a function'} "
                               "constrains the output already; drop response_format / structured_outputs / guided_*",
                          param="tool_choice")
    return plan
