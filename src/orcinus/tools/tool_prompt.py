"""Tools into the prompt. A chat template that knows tools (it reads `tools`) gets them as
HF templates expect; any other template gets a system message describing the functions and the
generic JSON reply format (parsers/json_generic.py reads it back). History turns with
tool_calls and `tool` results are rendered the same two ways."""
from __future__ import annotations

import json
from typing import Any

GENERIC_INSTRUCTIONS = (
    "You can call functions. Available functions (JSON schema of their arguments):\n{tools}\n"
    "To call a function, reply with only a JSON object {{\"name\": <function name>, \"arguments\": "
    "<arguments object>}} (a JSON list of such objects for several calls) and nothing else. "
    "Otherwise answer normally."
)


def template_knows_tools(chat_template: str | None) -> bool:
    return bool(chat_template) and "tools" in chat_template


def hf_tools(functions: list[dict]) -> list[dict]:
    return [{"type": "function", "function": f} for f in functions]


def render_messages(messages: list[dict], functions: list[dict] | None, native: bool) -> list[dict]:
    """Messages for the chat template. `messages` use OpenAI's shape (assistant tool_calls with
    arguments as JSON text, tool results with tool_call_id)."""
    out: list[dict[str, Any]] = []
    for m in messages:
        m = dict(m)
        calls = m.pop("tool_calls", None) or []
        if m["role"] == "assistant" and calls:
            if native:
                m["tool_calls"] = [{"id": c["id"], "type": "function",
                                    "function": {"name": c["function"]["name"],
                                                 "arguments": _loads(c["function"]["arguments"])}}
                                   for c in calls]
                m["content"] = m.get("content") or ""
            else:
                shown = [{"name": c["function"]["name"], "arguments": _loads(c["function"]["arguments"])}
                         for c in calls]
                m["content"] = json.dumps(shown[0] if len(shown) == 1 else shown, ensure_ascii=False)
        elif m["role"] == "tool" and not native:
            # Templates without tools know only the usual roles: a result is news for the model.
            m = {"role": "user", "content": f"Result of the function call {m.get('tool_call_id') or ''}: "
                                            f"{m.get('content') or ''}".replace("call : ", "call: ")}
        out.append(m)
    if functions and not native:
        text = GENERIC_INSTRUCTIONS.format(tools=json.dumps(functions, ensure_ascii=False))
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{text}"}
        else:
            out.insert(0, {"role": "system", "content": text})
    return out


def _loads(arguments: Any) -> Any:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return arguments
