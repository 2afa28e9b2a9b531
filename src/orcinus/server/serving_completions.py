"""POST /v1/completions: one or many prompts (text or token ids), n samples each, whole or streamed."""
from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import Response

from orcinus.engine.async_engine import GenerateRequest
from orcinus.engine.llm_engine import PromptType
from orcinus.request import CompletionOutput, RequestOutput
from orcinus.server.errors import OpenAIError
from orcinus.sampling_params import MAX_LOGPROBS
from orcinus.server.logprobs import (completion_logprobs, join_completion_logprobs, prompt_completion_logprobs,
                                     vllm_prompt_logprobs)
from orcinus.server.protocol import (CompletionChoice, CompletionChunk, CompletionLogprobs, CompletionRequest,
                                     CompletionResponse)
from orcinus.server.prompt_budget import encode_within
from orcinus.server.serving import FinishedTracker, ServingContext, client_of, new_request_id, respond, sse

if TYPE_CHECKING:
    from orcinus.tokenizer import Tokenizer


def _check_supported(body: CompletionRequest) -> None:
    if body.suffix:
        raise OpenAIError(400, "suffix is not supported", param="suffix")
    if body.best_of is not None and body.best_of != body.num_samples:
        raise OpenAIError(400, "best_of other than n is not supported", param="best_of")
    if body.max_tokens == 0 and not body.echo:
        raise OpenAIError(400, "max_tokens 0 generates nothing: it is allowed only with echo (the prompt and, "
                               "with logprobs, its log-probs)", param="max_tokens")


def _prompt_logprobs_k(body: CompletionRequest) -> int | None:
    """Top alternatives to compute at the prompt's positions: echo with logprobs shows them in the
    legacy shape, vLLM's prompt_logprobs in its own; one computation serves both."""
    wanted = [k for k in (body.logprobs if body.echo else None, body.prompt_logprobs) if k is not None]
    return max(wanted) if wanted else None


def _prompt(tokenizer: Tokenizer | None, prompt: str | list[int], max_model_len: int
            ) -> PromptType | Callable[[], PromptType]:
    """Text is tokenised on the engine's prompt-preparation thread, not in its iteration loop,
    and a text far too long for the context is refused after tokenising only its head. Without
    a tokenizer the engine itself refuses text, with its own message."""
    if isinstance(prompt, list) or tokenizer is None:
        return prompt
    return lambda: {"prompt": prompt, "prompt_token_ids": encode_within(tokenizer, prompt, max_model_len)}


async def _echo_texts(ctx: ServingContext, prompts: list[str | list[int]], request: Request) -> list[str]:
    """The prompt text to put in front of each completion for echo (token prompts decoded)."""
    if all(isinstance(p, str) for p in prompts):
        return list(prompts)
    tokenizer = ctx.engine.tokenizer
    if tokenizer is None:
        raise OpenAIError(400, "echo of token-id prompts needs a tokenizer", param="echo")
    return await ctx.engine.prepare(lambda: [p if isinstance(p, str) else tokenizer.decode(p) for p in prompts],
                                    client_of(request))


def _check_prompt_logprobs_size(prompts: list[str | list[int]], n: int, k: int, max_model_len: int) -> None:
    """Prompt log-probs make the response grow with the prompt times k + 1 entries, for each of the
    n choices: bounded, from what is known before tokenising (a token covers at least one byte),
    at one whole context with the most alternatives, as for one prompt at most."""
    tokens = sum(len(p) if isinstance(p, list) else min(max_model_len, len(p.encode("utf-8", "surrogatepass")) + 8)
                 for p in prompts)
    entries, bound = tokens * (k + 1) * n, max_model_len * (MAX_LOGPROBS + 1)
    if entries > bound:
        raise OpenAIError(400, f"prompt log-probs with {k} alternatives for up to {tokens} prompt tokens and n={n} "
                               f"would return up to {entries} entries, more than this server's bound of {bound}; "
                               "send fewer or shorter prompts, a smaller n or fewer log-probs", param="prompt")


def _check_echo_size(echo: list[str], n: int, bound: int) -> None:
    """echo repeats each prompt in front of each of its n samples: without a bound a 0.5 MB
    request made a 32 MB response (and 400 MB of server memory). The echoed text may total at
    most an eighth of the server's request-body limit (1 MiB by default), far more than prompts
    that fit a context hold."""
    echoed = sum(len(text.encode("utf-8", "surrogatepass")) for text in echo) * n
    if echoed > bound:
        raise OpenAIError(400, f"echo with n={n} would repeat {echoed} bytes of prompt in the response, more than "
                               f"this server's bound of {bound}; send a smaller n, shorter prompts, or no echo",
                          param="echo")


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
    score_only = body.max_tokens == 0  # echo only (checked above): the engine samples one token, not shown
    prompt_k = _prompt_logprobs_k(body)
    if prompt_k is not None:
        _check_prompt_logprobs_size(prompts, body.num_samples, prompt_k, max_len)
    params = body.sampling_params(1 if score_only else max_tokens, body.logprobs, defaults.values, prompt_k)
    echo = await _echo_texts(ctx, prompts, request) if body.echo else None
    if echo is not None:
        _check_echo_size(echo, body.num_samples, max(ctx.settings.max_request_bytes // 8, 65536))
    tokenizer = ctx.engine.tokenizer
    stream = await ctx.submit(request, [GenerateRequest(f"{request_id}-{i}", _prompt(tokenizer, p, max_len), params)
                               for i, p in enumerate(prompts)])
    tracker = FinishedTracker(ctx, stream, body.num_samples, count_completion=not score_only)
    view = _CompletionView(ctx.model_name, request_id, created, body, stream.request_ids, echo,
                           _first_piece(tokenizer), score_only)
    return await respond(request, tracker, view, body.streaming)


def _first_piece(tokenizer: Tokenizer | None) -> Callable[[int], str]:
    """The text of a prompt's first token (its entry is None: nothing scores it)."""
    if tokenizer is None:
        return lambda tok: f"token_id:{tok}"
    return lambda tok: tokenizer.token_pieces([tok])[0]


class _CompletionView:
    """Renders engine outputs as OpenAI completion objects; choice index = prompt * n + sample."""

    def __init__(self, model: str, request_id: str, created: int, body: CompletionRequest,
                 engine_ids: list[str], echo: list[str] | None,
                 first_piece: Callable[[int], str], score_only: bool) -> None:
        self.model = model
        self.id = request_id
        self.created = created
        self.body = body
        self.prompt_index = {rid: i for i, rid in enumerate(engine_ids)}
        self.echo = echo
        self.first_piece = first_piece
        self.score_only = score_only
        # echo with logprobs: the prompt's tokens lead the choice's legacy logprobs
        self.echo_logprobs = echo is not None and body.logprobs is not None

    def _visible(self, c: CompletionOutput) -> CompletionOutput:
        """What the client sees of a completion: with max_tokens 0, nothing (the engine's one
        token is not shown) and finish_reason length once it is done."""
        if not self.score_only:
            return c
        return dataclasses.replace(c, text="", token_ids=[], logprobs=None if c.logprobs is None else [],
                                   cumulative_logprob=None, finish_reason="length" if c.finish_reason else None,
                                   stop_reason=None)

    def _logprobs(self, out: RequestOutput, c: CompletionOutput, tok_from: int, text_from: int, first: bool
                  ) -> CompletionLogprobs | None:
        """Legacy logprobs of the tokens from tok_from on, the prompt's first when echoed."""
        if self.body.logprobs is None or c.logprobs is None:
            return None
        offset = text_from + (len(self._prefix(out)) if self.echo is not None else 0)
        generated = completion_logprobs(c.token_ids[tok_from:], c.logprobs[tok_from:], offset)
        if not (first and self.echo_logprobs):
            return generated
        prompt = prompt_completion_logprobs(out.prompt_token_ids, out.prompt_logprobs or [],
                                            self.first_piece(out.prompt_token_ids[0]), self.body.logprobs)
        return join_completion_logprobs(prompt, generated)

    def _prompt_logprobs(self, out: RequestOutput) -> list | None:
        if self.body.prompt_logprobs is None:
            return None
        return vllm_prompt_logprobs(out.prompt_token_ids, out.prompt_logprobs, self.body.prompt_logprobs)

    def _index(self, out: RequestOutput, c: CompletionOutput) -> int:
        return self.prompt_index[out.request_id] * self.body.num_samples + c.index

    def _prefix(self, out: RequestOutput) -> str:
        return self.echo[self.prompt_index[out.request_id]] if self.echo is not None else ""

    def response(self, finals: list[RequestOutput], tracker: FinishedTracker) -> CompletionResponse:
        choices = []
        for out in finals:
            prompt_logprobs = self._prompt_logprobs(out)
            for c in map(self._visible, out.outputs):
                choices.append(CompletionChoice(index=self._index(out, c), text=self._prefix(out) + c.text,
                                                logprobs=self._logprobs(out, c, 0, 0, True),
                                                finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                                                prompt_logprobs=prompt_logprobs))
        return CompletionResponse(id=self.id, created=self.created, model=self.model, choices=choices,
                                  usage=tracker.usage())

    async def events(self, tracker: FinishedTracker) -> AsyncIterator[str]:
        sent_text: dict[int, int] = {}
        sent_tokens: dict[int, int] = {}
        done: set[int] = set()  # choices whose finish_reason went out (n > 1 repeats them)
        want_logprobs = self.body.logprobs is not None
        async for out in tracker.stream:
            tracker.see(out)
            for c in map(self._visible, out.outputs):
                idx = self._index(out, c)
                if idx in done:
                    continue
                first = idx not in sent_text
                text_from, tok_from = sent_text.get(idx, 0), sent_tokens.get(idx, 0)
                delta = c.text[text_from:]
                new_tokens = len(c.token_ids) - tok_from
                if first and self.echo is not None:
                    delta = self._prefix(out) + delta
                if not delta and not c.finish_reason and not (want_logprobs and (new_tokens > 0 or first)):
                    continue  # e.g. text held back near a stop string: nothing to say yet
                logprobs = self._logprobs(out, c, tok_from, text_from, first) if want_logprobs else None
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
