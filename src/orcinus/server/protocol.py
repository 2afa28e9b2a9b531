"""The OpenAI wire format: request and response bodies as pydantic models.

Requests are strict (no "5" for 5, no NaN) and bounded, so out-of-range input is refused with a
400 before it reaches the engine, and the OpenAPI schema the app publishes says exactly what is
accepted. Unknown fields are tolerated (clients send fields newer than this server) and logged.
Beside OpenAI's parameters, vLLM's sampling extras are accepted in the body.
"""
from __future__ import annotations

import time
from typing import Annotated, Any, Literal, Mapping

from pydantic import (BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, field_validator,
                      model_serializer, model_validator)
from pydantic.json_schema import SkipJsonSchema

from orcinus.sampling_params import (INT32_MAX, MAX_LOGPROBS, MAX_REPETITION_PENALTY, MIN_REPETITION_PENALTY,
                                     SamplingParams)
from orcinus.server.protocol_structured import (DeltaToolCall, NamedToolChoice, ResponseFormat, ToolCall,
                                                ToolCallIn, ToolDefinition)
from orcinus.server.structured_request import structured_spec

# torch generators take 64-bit seeds; n > 1 derives seed + i per sample, so stay below the top.
_SEED_MIN, _SEED_MAX = -(2**63), 2**63 - 1 - 1024
# Absolute caps, whatever the server's settings (--max-n, --max-prompts-per-request lower them).
MAX_N = 128
MAX_PROMPTS = 256
MAX_STOP = 64

TokenId = Annotated[int, Field(ge=0, le=INT32_MAX)]
Text = Annotated[str, Field(min_length=1)]
Seed = Annotated[int, Field(ge=_SEED_MIN, le=_SEED_MAX)]


class RequestModel(BaseModel):
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="allow")


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


class ResponseModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------------------------- errors
class ErrorInfo(ResponseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(ResponseModel):
    error: ErrorInfo


# ---------------------------------------------------------------------------------- requests
class StreamOptions(RequestModel):
    include_usage: bool = False
    continuous_usage_stats: bool = Field(False, description="vLLM extra: usage on every chunk")


class SamplingRequest(RequestModel):
    """Fields shared by /v1/completions and /v1/chat/completions.

    OpenAI's own parameters are nullable, as in its API: null means the default.
    """

    model: str | None = Field(None, description="a served model name; omit for the default")
    n: int | None = Field(None, ge=1, le=MAX_N, description="samples per prompt (default 1)")
    temperature: float | None = Field(None, ge=0.0, le=100.0,
                                      description="default: the model's (its generation config), else 1; 0 is greedy")
    top_p: float | None = Field(None, gt=0.0, le=1.0,
                                description="default: the model's, else 1; values below 1e-6 keep only the most likely token")
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP)] | None = None
    seed: Seed | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0, description="default 0")
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0, description="default 0")
    logit_bias: dict[str, float] | None = Field(
        None, description="token id -> bias in [-100, 100] added to its logit (ids checked against the vocabulary)")
    user: str | None = Field(None, description="accepted and ignored")
    stream: bool | None = Field(None, description="default false")
    stream_options: StreamOptions | None = None
    # vLLM's extras
    top_k: int = Field(-1, ge=-1, le=INT32_MAX, description="-1 or 0: off; at or above the vocabulary size: off")
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, ge=MIN_REPETITION_PENALTY, le=MAX_REPETITION_PENALTY)
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0, le=INT32_MAX)
    stop_token_ids: Annotated[list[TokenId], Field(max_length=MAX_STOP)] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # ---- structured outputs (issue 20): one constraint source at most, each field honoured or 400 ----
    response_format: ResponseFormat | None = None
    structured_outputs: dict[str, Any] | None = Field(
        None, description="vLLM: exactly one of json, regex, choice, grammar, json_object")
    guided_json: dict[str, Any] | str | None = Field(None, description="vLLM's older spelling of structured_outputs.json")
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_whitespace_pattern: str | None = None
    guided_decoding_backend: str | None = Field(None, description="only 'llguidance' (or 'auto')")
    prompt_logprobs: int | None = Field(
        None, ge=0, le=MAX_LOGPROBS,
        description="vLLM extra: log-probs of the prompt's tokens, with this many top alternatives (0: only each "
                    "token's own), as a `prompt_logprobs` list; not with stream")
    # ---- end of structured outputs ----

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_shape(cls, stop: Any) -> Any:
        # Said plainly here: the union's own error would be "Input should be a valid string".
        if isinstance(stop, list):
            if len(stop) > MAX_STOP:
                raise ValueError(f"at most {MAX_STOP} stop strings are allowed, got {len(stop)}")
            if not all(isinstance(s, str) for s in stop):
                raise ValueError("stop must be a string or a list of strings")
        return stop

    @field_validator("stop_token_ids", mode="before")
    @classmethod
    def _stop_ids_shape(cls, ids: Any) -> Any:
        if isinstance(ids, list):
            if len(ids) > MAX_STOP:
                raise ValueError(f"at most {MAX_STOP} stop token ids are allowed, got {len(ids)}")
            _check_token_ids(ids, "stop_token_ids")
        return ids

    @property
    def num_samples(self) -> int:
        return _or(self.n, 1)

    @property
    def streaming(self) -> bool:
        return _or(self.stream, False)

    def sampling_params(self, max_tokens: int | None, logprobs: int | None,
                        defaults: Mapping[str, Any] | None = None,
                        prompt_logprobs: int | None = None) -> SamplingParams:
        """The engine's settings for this request; raises SamplingParamsError on combinations
        the field bounds cannot express (e.g. min_tokens above max_tokens). A field the client
        left out (or sent as null) takes the model's default from `defaults` (its generation
        config), else OpenAI's/vLLM's."""
        model = defaults or {}

        def pick(name: str, fallback: Any) -> Any:
            value = getattr(self, name) if name in self.model_fields_set else None
            return model.get(name, fallback) if value is None else value

        return SamplingParams(
            n=self.num_samples, temperature=pick("temperature", 1.0), top_p=pick("top_p", 1.0),
            top_k=pick("top_k", -1), min_p=pick("min_p", 0.0), repetition_penalty=pick("repetition_penalty", 1.0),
            presence_penalty=_or(self.presence_penalty, 0.0), frequency_penalty=_or(self.frequency_penalty, 0.0),
            seed=self.seed, max_tokens=max_tokens, min_tokens=self.min_tokens, stop=self.stop,
            stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos, logprobs=logprobs,
            include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens,
            structured_outputs=structured_spec(self), logit_bias=self.logit_bias or None,
            prompt_logprobs=prompt_logprobs,
        )

    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def continuous_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.continuous_usage_stats


def _check_token_ids(ids: list, what: str) -> None:
    # min/max run in C: a Python loop over millions of ids would hold the event loop for seconds.
    # Items that are not ints make them raise; the schema then says what is wrong with those.
    try:
        if not ids or (0 <= min(ids) and max(ids) <= INT32_MAX):
            return
    except TypeError:
        return
    for i, t in enumerate(ids):  # only for a body already known to be wrong
        if isinstance(t, int) and not isinstance(t, bool) and not 0 <= t <= INT32_MAX:
            raise ValueError(f"{what} must be token ids in [0, {INT32_MAX}]; item {i} is {t}")


class CompletionRequest(SamplingRequest):
    prompt: Text | Annotated[list[Text], Field(min_length=1, max_length=MAX_PROMPTS)] \
        | Annotated[list[TokenId], Field(min_length=1)] \
        | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1, max_length=MAX_PROMPTS)]
    max_tokens: int | None = Field(16, ge=0, le=INT32_MAX,
                                   description="default 16; null: up to the context length; 0 only with echo "
                                               "(the prompt and, with logprobs, its log-probs: scoring a text)")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool | None = Field(None, description="default false")
    # Accepted only equal to n (no server-side best-of selection), so not advertised.
    best_of: SkipJsonSchema[int | None] = None
    suffix: str | None = Field(None, description="not supported")

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, prompt: Any) -> Any:
        # Clear messages for what the union would report as "Input should be a valid string".
        if not isinstance(prompt, list) or not prompt:
            return prompt
        if all(isinstance(p, (str, list)) for p in prompt):
            if len(prompt) > MAX_PROMPTS:
                raise ValueError(f"at most {MAX_PROMPTS} prompts are allowed per request, got {len(prompt)}")
            for j, p in enumerate(prompt):
                if isinstance(p, list):
                    _check_token_ids(p, f"prompt[{j}]")
        else:
            _check_token_ids(prompt, "prompt")
        return prompt

    def prompts(self) -> list[str | list[int]]:
        """The batch of prompts this request holds (OpenAI allows one or many, text or ids)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if isinstance(p[0], int):
            return [p]  # one tokenised prompt
        return list(p)


class TextPart(RequestModel):
    type: Literal["text"]
    text: str


class ChatMessage(RequestModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    # ---- tool calling history (issue 20) ----
    tool_calls: list[ToolCallIn] | None = None  # an assistant turn that called tools
    tool_call_id: str | None = None  # a tool turn: which call this is the result of
    refusal: str | None = None  # an assistant turn's refusal, echoed back by clients

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, content: Any) -> Any:
        # Say plainly why an image or audio part is refused, rather than a union type error.
        if isinstance(content, list):
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if isinstance(kind, str) and kind != "text":
                    raise ValueError(f"content parts of type {kind!r} are not supported; only 'text'")
        return content

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=INT32_MAX,
                                   description="deprecated by OpenAI; max_completion_tokens wins")
    max_completion_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    logprobs: bool | None = Field(None, description="default false")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    # ---- tools (issue 20) ----
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = Field(None, description="default true")
    # ---- end of tools ----
    add_generation_prompt: bool = Field(True, description="vLLM extra: end the prompt with the assistant's turn")

    @model_validator(mode="after")
    def _top_logprobs_needs_logprobs(self) -> "ChatCompletionRequest":
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs to be true")
        return self

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# ---------------------------------------------------------------------------------- responses
class _GenerationResponse(ResponseModel):
    """OpenAI types system_fingerprint as a string and a completion's usage as an object (no
    null): left out while there is none."""

    @model_serializer(mode="wrap")
    def _omit_null_fingerprint(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        for key in ("system_fingerprint", "usage", "prompt_logprobs"):
            if key in data and data[key] is None:
                del data[key]
        return data


class UsageInfo(ResponseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionLogprobs(ResponseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class PromptLogprob(ResponseModel):
    """vLLM's shape of one entry of `prompt_logprobs`."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# vLLM's prompt_logprobs: per prompt token, None for the first, else token id (as a JSON key) -> entry
PromptLogprobsList = list[dict[str, PromptLogprob] | None]


class _OmitNullPromptLogprobs(ResponseModel):
    """`prompt_logprobs` (a vLLM extra) is left out unless asked, so OpenAI's shape is unchanged."""

    @model_serializer(mode="wrap")
    def _omit_null_prompt_logprobs(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        if data.get("prompt_logprobs", 0) is None:
            del data["prompt_logprobs"]
        return data


class CompletionChoice(_OmitNullPromptLogprobs):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None
    stop_reason: int | str | None = Field(None, description="the stop string or token id that ended it")
    prompt_logprobs: PromptLogprobsList | None = Field(None, description="vLLM extra, with prompt_logprobs")


class CompletionResponse(_GenerationResponse):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


class TopLogprob(ResponseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(ResponseModel):
    content: list[TokenLogprob] | None = None
    refusal: list[TokenLogprob] | None = None  # required by OpenAI's schema (null: no refusal)


class AssistantMessage(ResponseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None  # always present, as in OpenAI's schema (null: no refusal)
    tool_calls: list[ToolCall] | None = None

    @model_serializer(mode="wrap")
    def _omit_no_tool_calls(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # tool_calls is an optional array in OpenAI's schema: left out, never null
        return {k: v for k, v in handler(self).items() if k != "tool_calls" or v is not None}


class ChatChoice(ResponseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"] | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(_GenerationResponse):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None
    # vLLM extra, with prompt_logprobs: of the templated prompt, once for all choices (left out otherwise)
    prompt_logprobs: PromptLogprobsList | None = None


class DeltaMessage(ResponseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None

    @model_serializer(mode="wrap")
    def _omit_none(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # OpenAI's deltas leave keys out rather than send nulls ({"content": "x"}, then {}).
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatStreamChoice(ResponseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"] | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(_GenerationResponse):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


class CompletionChunk(_GenerationResponse):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


class ModelCard(ResponseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "orcinus"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(ResponseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class HealthResponse(ResponseModel):
    status: Literal["ok", "unhealthy"]
    reason: str | None = None


class VersionResponse(ResponseModel):
    version: str
