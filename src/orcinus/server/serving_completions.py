"""POST /v1/completions: one or many prompts (text or token ids), n samples each, whole or streamed."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import Response

from orcinus.engine.async_engine import GenerateRequest
from orcinus.engine.llm_engine import PromptType
from orcinus.request import CompletionOutput, RequestOutput
from orcinus.server.errors import OpenAIError
from orcinus.server.logprobs import completion_logprobs
from orcinus.server.protocol import CompletionChoice, CompletionChunk, CompletionRequest, CompletionResponse
from orcinus.server.serving import FinishedTracker, ServingContext, new_request_id, respond, sse

if TYPE_CHECKING:
    from orcinus.tokenizer import Tokenizer


def _check_supported(body: CompletionRequest) -> None:
    if body.suffix:
        raise OpenAIError(400, "suffix is not supported", param="suffix")
    if body.best_of is not None and body.best_of != body.num_samples:
        raise OpenAIError(400, "best_of other than n is not supported", param="best_of")
    if body.echo and body.logprobs is not None:
        raise OpenAIError(400, "echo with logprobs would need prompt log-probs, which are not supported",
                          param="echo")


def _prompt(tokenizer: Tokenizer | None, prompt: str | list[int]) -> PromptType | Callable[[], PromptType]:
    """Text is tokenised on the engine's prompt-preparation thread, not in its iteration loop.
    Without a tokenizer the engine itself refuses text, with its own message."""
    if isinstance(prompt, list) or tokenizer is None:
        return prompt
    return lambda: {"prompt": prompt, "prompt_token_ids": tokenizer.encode(prompt)}


async def _echo_texts(ctx: ServingContext, prompts: list[str | list[int]]) -> list[str]:
    """The prompt text to put in front of each completion for echo (token prompts decoded)."""
    if all(isinstance(p, str) for p in prompts):
        return list(prompts)
    tokenizer = ctx.engine.tokenizer
    if tokenizer is None:
        raise OpenAIError(400, "echo of token-id prompts needs a tokenizer", param="echo")
    return await ctx.engine.prepare(lambda: [p if isinstance(p, str) else tokenizer.decode(p) for p in prompts])


async def create_completion(ctx: ServingContext, body: CompletionRequest, request: Request) -> Response:
    ctx.check_request(body)
    _check_supported(body)
    created = int(time.time())
    request_id = new_request_id("cmpl", request)
    prompts = body.prompts()
    if len(prompts) > ctx.settings.max_prompts_per_request:
        raise OpenAIError(400, f"at most {ctx.settings.max_prompts_per_request} prompts are allowed per request on "
                               f"this server, got {len(prompts)}", param="prompt")
    max_len = ctx.engine.max_model_len
    for p in prompts:
        if isinstance(p, str):
            ctx.check_text_length(len(p), "prompt")
        elif len(p) >= max_len:  # refused here, not after the engine thread has read every id
            raise OpenAIError(400, f"the prompt has {len(p)} tokens but the model's context length is {max_len}; "
                                   "shorten the prompt", param="prompt")
    defaults = ctx.engine.generation_defaults
    # Left out, max_tokens is the model's default, else OpenAI's 16; an explicit null means no bound.
    max_tokens = body.max_tokens if "max_tokens" in body.model_fields_set \
        else defaults.get("max_tokens", body.max_tokens)
    params = body.sampling_params(max_tokens, body.logprobs, defaults.values)
    echo = await _echo_texts(ctx, prompts) if body.echo else None
    tokenizer = ctx.engine.tokenizer
    stream = await ctx.submit(request, [GenerateRequest(f"{request_id}-{i}", _prompt(tokenizer, p), params)
                               for i, p in enumerate(prompts)])
    tracker = FinishedTracker(ctx, stream, body.num_samples)
    view = _CompletionView(ctx.model_name, request_id, created, body, stream.request_ids, echo)
    return await respond(request, tracker, view, body.streaming)


class _CompletionView:
    """Renders engine outputs as OpenAI completion objects; choice index = prompt * n + sample."""

    def __init__(self, model: str, request_id: str, created: int, body: CompletionRequest,
                 engine_ids: list[str], echo: list[str] | None) -> None:
        self.model = model
        self.id = request_id
        self.created = created
        self.body = body
        self.prompt_index = {rid: i for i, rid in enumerate(engine_ids)}
        self.echo = echo

    def _index(self, out: RequestOutput, c: CompletionOutput) -> int:
        return self.prompt_index[out.request_id] * self.body.num_samples + c.index

    def _prefix(self, out: RequestOutput) -> str:
        return self.echo[self.prompt_index[out.request_id]] if self.echo is not None else ""

    def response(self, finals: list[RequestOutput], tracker: FinishedTracker) -> CompletionResponse:
        choices = []
        for out in finals:
            for c in out.outputs:
                logprobs = None
                if self.body.logprobs is not None and c.logprobs is not None:
                    logprobs = completion_logprobs(c.token_ids, c.logprobs, 0)
                choices.append(CompletionChoice(index=self._index(out, c), text=self._prefix(out) + c.text,
                                                logprobs=logprobs, finish_reason=c.finish_reason,
                                                stop_reason=c.stop_reason))
        return CompletionResponse(id=self.id, created=self.created, model=self.model, choices=choices,
                                  usage=tracker.usage())

    async def events(self, tracker: FinishedTracker) -> AsyncIterator[str]:
        sent_text: dict[int, int] = {}
        sent_tokens: dict[int, int] = {}
        done: set[int] = set()  # choices whose finish_reason went out (n > 1 repeats them)
        want_logprobs = self.body.logprobs is not None
        async for out in tracker.stream:
            tracker.see(out)
            for c in out.outputs:
                idx = self._index(out, c)
                if idx in done:
                    continue
                first = idx not in sent_text
                text_from, tok_from = sent_text.get(idx, 0), sent_tokens.get(idx, 0)
                delta = c.text[text_from:]
                new_tokens = len(c.token_ids) - tok_from
                if first and self.echo is not None:
                    delta = self._prefix(out) + delta
                if not delta and not c.finish_reason and not (want_logprobs and new_tokens > 0):
                    continue  # e.g. text held back near a stop string: nothing to say yet
                logprobs = None
                if want_logprobs and c.logprobs is not None:
                    logprobs = completion_logprobs(c.token_ids[tok_from:], c.logprobs[tok_from:], text_from)
                sent_text[idx] = max(text_from, len(c.text))
                sent_tokens[idx] = len(c.token_ids)
                if c.finish_reason:
                    done.add(idx)
                choice = CompletionChoice(index=idx, text=delta, logprobs=logprobs, finish_reason=c.finish_reason,
                                          stop_reason=c.stop_reason)
                usage = tracker.usage() if self.body.continuous_usage() else None
                yield sse(CompletionChunk(id=self.id, created=self.created, model=self.model, choices=[choice],
                                          usage=usage))
        if self.body.include_usage():
            yield sse(CompletionChunk(id=self.id, created=self.created, model=self.model, choices=[],
                                      usage=tracker.usage()))
