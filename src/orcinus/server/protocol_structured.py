"""Wire models for structured outputs, tools and tokenisation (issue 20), apart from
protocol.py's sampling fields. Request models are strict like the rest; response models never
hold null where OpenAI's schema types a string or an object (optional keys are left out)."""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer, model_validator

from orcinus.sampling_params import INT32_MAX

FunctionName = Annotated[str, Field(pattern=r"^[a-zA-Z0-9_.-]{1,64}$")]


class _Req(BaseModel):
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="allow")


class _Resp(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_serializer(mode="wrap")
    def _omit_none(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None or k in self._keep_null}

    _keep_null: frozenset[str] = frozenset()


# ---------------------------------------------------------------------------------- requests
class JsonSchemaFormat(_Req):
    name: FunctionName
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Req):
    # The published schema lists the accepted types; the validator below words the refusal.
    type: str = Field(json_schema_extra={"enum": ["text", "json_object", "json_schema"]})
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _known(self) -> "ResponseFormat":
        if self.type not in ("text", "json_object", "json_schema"):
            raise ValueError(f"response_format type {self.type!r} is not supported; "
                             "use 'text', 'json_object' or 'json_schema'")
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type 'json_schema' needs a json_schema object")
        return self


class FunctionDefinition(_Req):
    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDefinition(_Req):
    type: Literal["function"]
    function: FunctionDefinition


class _ChosenFunction(_Req):
    name: str


class NamedToolChoice(_Req):
    type: Literal["function"]
    function: _ChosenFunction


class ToolCallFunctionIn(_Req):
    name: str
    arguments: str


class ToolCallIn(_Req):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunctionIn


class TokenizeRequest(_Req):
    """vLLM's /tokenize: a prompt, or chat messages rendered with the template."""
    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one(self) -> "TokenizeRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self


class DetokenizeRequest(_Req):
    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0, le=INT32_MAX)]]


# ---------------------------------------------------------------------------------- responses
class FunctionCall(_Resp):
    name: str
    arguments: str


class ToolCall(_Resp):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class DeltaFunctionCall(_Resp):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(_Resp):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall | None = None


class TokenizeResponse(_Resp):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(_Resp):
    prompt: str


