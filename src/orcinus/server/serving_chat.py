"""POST /v1/chat/completions: messages rendered with the model's chat template, whole or streamed."""
from __future__ import annotations

import time
from typing import AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import Response

from orcinus.engine.async_engine import AsyncEngine, GenerateRequest
from orcinus.engine.llm_engine import PromptType
from orcinus.request import CompletionOutput, RequestOutput
from orcinus.server.logprobs import chat_logprobs, vllm_prompt_logprobs
from orcinus.server.protocol import (AssistantMessage, ChatChoice, ChatCompletionChunk, ChatCompletionRequest,
                                     ChatCompletionResponse, ChatLogprobs, ChatStreamChoice, DeltaMessage)
from orcinus.server.chat_tools import ToolPlan, delta_tool_calls, plan_tools
from orcinus.server.prompt_budget import check_head_fits
from orcinus.server.protocol_structured import FunctionCall, ToolCall
from orcinus.server.serving import FinishedTracker, ServingContext, new_request_id, respond, sse
from orcinus.tools.tool_prompt import hf_tools, render_messages, template_knows_tools


def _message(m) -> dict:
    # The OpenAI 'developer' role is the newer name of 'system'; templates know only the latter.
    out = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
    if m.tool_calls:
        out["tool_calls"] = [c.model_dump() for c in m.tool_calls]
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    return out


def chat_prompt(engine: AsyncEngine, body: ChatCompletionRequest, plan: ToolPlan | None = None
                ) -> Callable[[], PromptType]:
    """A prompt builder, run on the engine's prompt-preparation thread (tokenizer work is slow
    for long conversations and must not hold up the event loop or the iterations)."""
    messages = [_message(m) for m in body.messages]
    add_generation_prompt = body.add_generation_prompt
    functions = plan.prompt_functions() if plan is not None else None

    def build() -> PromptType:
        tok = engine.tokenizer
        if tok is None:
            raise ValueError("chat needs a tokenizer, and this server runs without one (skip_tokenizer_init)")
        # Refuse a conversation whose text alone cannot fit before rendering and tokenising all of it.
        check_head_fits(tok, "\n".join(m["content"] or "" for m in messages), engine.max_model_len, "messages")
        native = template_knows_tools(tok.chat_template)
        rendered = render_messages(messages, functions, native)
        extra = {"tools": hf_tools(functions)} if functions and native else {}
        return tok.chat_prompt(rendered, add_generation_prompt=add_generation_prompt, **extra)

    return build


async def create_chat_completion(ctx: ServingContext, body: ChatCompletionRequest, request: Request) -> Response:
    ctx.check_request(body)
    plan = plan_tools(body, ctx.settings.tool_call_parser)
    created = int(time.time())
    request_id = new_request_id("chatcmpl", request)
    top = (body.top_logprobs or 0) if body.logprobs else None
    defaults = ctx.engine.generation_defaults
    max_tokens = body.max_new_tokens()
    params = body.sampling_params(max_tokens, top, defaults.values, body.prompt_logprobs)
    if plan is not None and plan.spec() is not None:
        params.structured_outputs = plan.spec()
    if max_tokens is None:
        # Left out: the model's default, bounded by the server's (None: no bound), and never more
        # than the context has room for after the prompt (as vLLM does without a bound).
        bounds = [b for b in (defaults.get("max_tokens"), ctx.settings.default_max_tokens) if b is not None]
        params.max_tokens_cap = min(bounds) if bounds else None
    ctx.check_text_length(sum(len(m.text()) for m in body.messages), "messages")
    stream = await ctx.submit(request, [GenerateRequest(request_id, chat_prompt(ctx.engine, body, plan), params)])
    tracker = FinishedTracker(ctx, stream, body.num_samples)
    view = _ChatView(ctx.model_name, request_id, created, body, top, ctx.token_bytes, plan)
    return await respond(request, tracker, view, body.streaming)


class _ChatView:
    def __init__(self, model: str, request_id: str, created: int, body: ChatCompletionRequest,
                 top_logprobs: int | None, token_bytes: Callable[[int, str], list[int]] | None = None,
                 plan: ToolPlan | None = None) -> None:
        self.plan = plan
        self.model = model
        self.token_bytes = token_bytes
        self.id = request_id
        self.created = created
        self.body = body
        self.top = top_logprobs

    def _logprobs(self, c: CompletionOutput, start: int = 0) -> ChatLogprobs | None:
        if self.top is None or c.logprobs is None:
            return None
        return chat_logprobs(c.token_ids[start:], c.logprobs[start:], self.top, self.token_bytes)

    def _message(self, c: CompletionOutput) -> tuple[AssistantMessage, str | None]:
        """The choice's message and finish_reason; a text read as tool calls carries them."""
        if self.plan is None or c.finish_reason is None:
            return AssistantMessage(content=c.text), c.finish_reason
        content, calls = self.plan.extract(c.text)
        if not calls:
            return AssistantMessage(content=content), c.finish_reason
        tool_calls = [ToolCall(id=call.id, function=FunctionCall(name=call.name, arguments=call.arguments))
                      for call in calls]
        reason = "tool_calls" if c.finish_reason == "stop" else c.finish_reason
        return AssistantMessage(content=content, tool_calls=tool_calls), reason

    def response(self, finals: list[RequestOutput], tracker: FinishedTracker) -> ChatCompletionResponse:
        choices = []
        for c in finals[0].outputs:
            message, reason = self._message(c)
            choices.append(ChatChoice(index=c.index, message=message, logprobs=self._logprobs(c),
                                      finish_reason=reason, stop_reason=c.stop_reason))
        return ChatCompletionResponse(id=self.id, created=self.created, model=self.model, choices=choices,
                                      usage=tracker.usage(), prompt_logprobs=None if self.body.prompt_logprobs is None
                                      else vllm_prompt_logprobs(finals[0].prompt_token_ids, finals[0].prompt_logprobs,
                                                                self.body.prompt_logprobs))

    def _chunk(self, choices: list[ChatStreamChoice], tracker: FinishedTracker, final_usage: bool = False) -> str:
        usage = tracker.usage() if final_usage or self.body.continuous_usage() else None
        return sse(ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=choices,
                                       usage=usage))

    async def events(self, tracker: FinishedTracker) -> AsyncIterator[str]:
        n = self.body.num_samples
        # OpenAI opens every choice with the role, before any content.
        for i in range(n):
            yield self._chunk([ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))], tracker)
        sent_text = [0] * n
        sent_tokens = [0] * n
        done = [False] * n  # n > 1 repeats finished choices in later outputs
        # A choice that may call tools is read as it grows (tools/stream.py): text that cannot be
        # a call goes out as content, calls as delta.tool_calls, what is undecided waits.
        tools = [self.plan.stream() for _ in range(n)] if self.plan is not None else None
        async for out in tracker.stream:
            tracker.see(out)
            for c in out.outputs:
                i = c.index
                if done[i]:
                    continue
                finished = c.finish_reason is not None
                reason = c.finish_reason
                if tools is None:
                    content, calls = c.text[sent_text[i]:], None
                    sent_text[i] = max(sent_text[i], len(c.text))
                else:
                    delta = tools[i].finish(c.text) if finished else tools[i].feed(c.text)
                    content, calls = delta.content, delta_tool_calls(delta)
                    if tools[i].made_calls and reason == "stop":
                        reason = "tool_calls"  # as the whole response's _message says
                new_tokens = len(c.token_ids) - sent_tokens[i]
                if not content and not calls and not finished and not (self.top is not None and new_tokens > 0):
                    continue
                logprobs = self._logprobs(c, sent_tokens[i])
                sent_tokens[i] = len(c.token_ids)
                done[i] = finished
                # A choice's closing chunk has an empty delta when no text is left, as OpenAI's;
                # a chunk with only log-probs has empty content.
                if not content and (finished or calls):
                    content = None
                choice = ChatStreamChoice(index=i, delta=DeltaMessage(content=content, tool_calls=calls),
                                          logprobs=logprobs, finish_reason=reason, stop_reason=c.stop_reason)
                yield self._chunk([choice], tracker)
        if self.body.include_usage():
            yield self._chunk([], tracker, final_usage=True)
