"""What a request constrains its output to, in vLLM's `StructuredOutputsParams` shape.

Exactly one of `json`, `regex`, `choice`, `grammar`, `json_object` (or `structural_tag`, which
this engine refuses by name) is set. Whitespace between JSON tokens is bounded by default
(`DEFAULT_JSON_WHITESPACE`), so a JSON answer cannot loop on spaces until max_tokens."""
from __future__ import annotations

import json as _json
from dataclasses import dataclass, field
from typing import Any

# At most this much whitespace between two JSON tokens: enough for pretty-printed JSON nested a few
# levels deep, few enough that a model cannot spend its max_tokens on blanks.
DEFAULT_JSON_WHITESPACE = r"[\n\t ]{0,20}"


class GrammarError(ValueError):
    """A structured-output spec that cannot be compiled; the message names the problem and
    `param` the request field it came from (the server answers 400)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


_KINDS = ("json", "regex", "choice", "grammar", "json_object")


@dataclass
class StructuredOutputsParams:
    json: dict | str | None = None  # a JSON schema (object or its JSON text)
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None  # Lark (llguidance's dialect) or GBNF (converted to Lark)
    json_object: bool | None = None  # any JSON object
    disable_any_whitespace: bool = False  # JSON with no whitespace between tokens at all
    whitespace_pattern: str | None = None  # regex for whitespace between JSON tokens
    structural_tag: str | None = None  # accepted in the shape, refused (no backend support here)
    # set by the server for tool calls: names the origin of the schema in error messages
    param: str = field(default="structured_outputs", compare=False)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        p = self.param
        if self.structural_tag is not None:
            raise GrammarError("structured_outputs.structural_tag is not supported by this server; "
                               "use json, regex, choice, grammar or json_object", p)
        set_kinds = [k for k in _KINDS if getattr(self, k) not in (None, False)]
        if len(set_kinds) != 1:
            raise GrammarError(
                "structured outputs need exactly one of json, regex, choice, grammar, json_object; "
                f"got {', '.join(set_kinds) or 'none'}", p)
        if isinstance(self.json, str):
            try:
                self.json = _json.loads(self.json)
            except ValueError as exc:
                raise GrammarError(f"the JSON schema is not valid JSON: {exc}", p) from exc
        if self.json is not None and not isinstance(self.json, (dict, bool)):
            raise GrammarError("a JSON schema must be an object", p)
        if self.regex is not None and not isinstance(self.regex, str):
            raise GrammarError("regex must be a string", p)
        if self.grammar is not None and (not isinstance(self.grammar, str) or not self.grammar.strip()):
            raise GrammarError("grammar must be a non-empty string", p)
        if self.choice is not None:
            if (not isinstance(self.choice, (list, tuple)) or not self.choice
                    or not all(isinstance(c, str) and c for c in self.choice)):
                raise GrammarError("choice must be a non-empty list of non-empty strings", p)
            self.choice = list(self.choice)
        if self.whitespace_pattern is not None and not isinstance(self.whitespace_pattern, str):
            raise GrammarError("whitespace_pattern must be a string", p)

    @property
    def kind(self) -> str:
        return next(k for k in _KINDS if getattr(self, k) not in (None, False))

    def key(self) -> tuple[str, str]:
        """A hashable, canonical name of the grammar (the compile cache's key)."""
        kind = self.kind
        value: Any = True if kind == "json_object" else getattr(self, kind)
        ws = "" if kind not in ("json", "json_object") else \
            ("none" if self.disable_any_whitespace else self.whitespace_pattern or DEFAULT_JSON_WHITESPACE)
        return kind, _json.dumps([value, ws], sort_keys=True, ensure_ascii=False)

    @classmethod
    def from_dict(cls, data: dict, param: str = "structured_outputs") -> "StructuredOutputsParams":
        if not isinstance(data, dict):
            raise GrammarError(f"{param} must be an object", param)
        known = {f for f in cls.__dataclass_fields__ if f != "param"}
        # vLLM's other fields select backends and fallbacks; naming one we do not honour is an
        # error rather than a silent no-op.
        unknown = sorted(set(data) - known)
        if unknown:
            raise GrammarError(f"{param} has unsupported field(s): {', '.join(unknown)}; supported: "
                               f"{', '.join(sorted(known))}", param)
        return cls(**data, param=param)
