"""What the completions and chat endpoints share: model-name checks, submitting to the engine,
following a submission to its end (with the client's disconnect aborting it), SSE framing."""
from __future__ import annotations

import asyncio
import functools
import logging
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable, Protocol, TypeVar

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel
from starlette.types import Receive, Scope, Send

from orcinus.engine.async_engine import AsyncEngine, GenerateRequest, RequestStream
from orcinus.request import RequestOutput
from orcinus.server.errors import OpenAIError, from_exception
from orcinus.server.metrics import ServerMetrics
from orcinus.server.protocol import SamplingRequest, UsageInfo
from orcinus.server.settings import ServerSettings

logger = logging.getLogger(__name__)
T = TypeVar("T")

SSE_DONE = "data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_MAX_WARNED_FIELDS = 100


def sse(payload: BaseModel) -> str:
    # pydantic writes a non-finite float as null; json.dumps would write invalid JSON.
    return f"data: {payload.model_dump_json()}\n\n"


def json_response(payload: BaseModel, headers: dict[str, str] | None = None) -> Response:
    return Response(payload.model_dump_json(), media_type="application/json", headers=headers)


@dataclass
class ServingContext:
    engine: AsyncEngine
    metrics: ServerMetrics
    settings: ServerSettings
    _warned_fields: set[str] = field(default_factory=set)

    @property
    def model_name(self) -> str:
        return self.settings.served_model_names[0]

    def check_request(self, body: SamplingRequest) -> None:
        """Refuse what the schema cannot: an unknown model name, features we do not implement,
        more than this server's limits."""
        if body.model and body.model not in self.settings.served_model_names:
            raise OpenAIError(404, f"the model {body.model!r} does not exist here; this server serves "
                                   f"{', '.join(map(repr, self.settings.served_model_names))}",
                              param="model", code="model_not_found")
        if body.prompt_logprobs is not None and body.streaming:
            # as vLLM: the list is a property of the whole prompt, with no place in a stream's deltas
            raise OpenAIError(400, "prompt_logprobs is not available with stream; use echo with logprobs on "
                                   "/v1/completions to stream a prompt's log-probs", param="prompt_logprobs")
        if body.num_samples > self.settings.max_n:
            raise OpenAIError(400, f"n must be at most {self.settings.max_n} on this server, got {body.num_samples}",
                              param="n")
        extra = set(body.model_extra or {}) - self._warned_fields
        if extra and len(self._warned_fields) < _MAX_WARNED_FIELDS:  # bounded: clients choose these names
            self._warned_fields |= extra
            logger.warning("ignoring request fields this server does not know: %s",
                           ", ".join(repr(name[:40]) for name in sorted(extra)[:10]))

    def check_text_length(self, num_chars: int, param: str) -> None:
        """Refuse text that cannot fit the context, from its length alone: tokenising megabytes
        only to find them too long would cost seconds of a preparation thread."""
        bound = self.max_prompt_chars
        if bound is not None and num_chars > bound:
            raise OpenAIError(400, f"the prompt has {num_chars} characters, more than the model's context of "
                                   f"{self.engine.max_model_len} tokens can hold (at most {bound} characters "
                                   "with this tokenizer); shorten the prompt", param=param)

    @functools.cached_property
    def max_prompt_chars(self) -> int | None:
        """Characters beyond which a text cannot fit the context whatever it says: a token covers
        at most as many characters as its longest vocabulary entry has (byte-level vocabularies
        spell each byte as one character, and a character is at least one byte)."""
        tokenizer = self.engine.tokenizer
        if tokenizer is None:
            return None
        longest = max((len(piece) for piece in tokenizer.hf.get_vocab()), default=1)
        return self.engine.max_model_len * max(longest, 1)

    @functools.cached_property
    def token_bytes(self) -> Callable[[int, str], list[int]]:
        """A token's own bytes for log-probs (token_bytes.py)."""
        from orcinus.token_bytes import token_bytes_fn

        return token_bytes_fn(self.engine.tokenizer)

    async def submit(self, request: Request, requests: list[GenerateRequest]) -> RequestStream:
        """Submit to the engine; whatever it refuses becomes the error the client should see. A
        client that disconnects while its prompts wait for preparation drops them (raises
        ClientDisconnected)."""
        try:
            return await until_disconnect(request, self.engine.submit(requests, client_of(request)))
        except ClientDisconnected:
            raise
        except Exception as exc:
            raise from_exception(exc) from exc


def client_of(request: Request) -> str:
    """Who takes turns for prompt preparation: the peer address (behind a proxy, everyone is the
    proxy and turns are first come, first served again)."""
    return request.client.host if request.client else ""


def new_request_id(prefix: str, request: Request) -> str:
    """The client's X-Request-Id when it sent a sane one (ties logs together), else a fresh id."""
    given = request.headers.get("x-request-id", "")
    if 0 < len(given) <= 128 and given.isprintable():
        return f"{prefix}-{given}-{uuid.uuid4().hex[:8]}"
    return f"{prefix}-{uuid.uuid4().hex}"


class FinishedTracker:
    """Follows a submission to its end: records metrics once per finished request, aborts (and
    counts) whatever had not finished when the consumer stops."""

    def __init__(self, ctx: ServingContext, stream: RequestStream, num_seqs_per_request: int,
                 count_completion: bool = True) -> None:
        self.ctx = ctx
        # False for completions with max_tokens 0 (echo only): the engine's one token is not shown
        self.count_completion = count_completion
        self.stream = stream
        self.n = num_seqs_per_request
        self.final: dict[str, RequestOutput] = {}
        self.latest: dict[str, RequestOutput] = {}
        self._closed = False

    def see(self, out: RequestOutput) -> None:
        self.latest[out.request_id] = out
        if out.finished and out.request_id not in self.final:
            self.final[out.request_id] = out
            self.ctx.metrics.observe_finished(out)

    def close(self) -> None:
        """Abort what has not finished; idempotent, as several ways out may call it."""
        if self._closed:
            return
        self._closed = True
        unfinished = [rid for rid in self.stream.request_ids if rid not in self.final]
        self.stream.close()
        if unfinished:
            self.ctx.metrics.observe_aborted(len(unfinished) * self.n)

    def usage(self) -> UsageInfo:
        outs = self.latest.values()
        prompt = sum(len(o.prompt_token_ids) for o in outs)
        completion = sum(len(c.token_ids) for o in outs for c in o.outputs) if self.count_completion else 0
        return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    async def run_to_end(self) -> list[RequestOutput]:
        """All final outputs, in submission order."""
        async for out in self.stream:
            self.see(out)
        return [self.final[rid] for rid in self.stream.request_ids]


class ResponseView(Protocol):
    """How one endpoint renders engine outputs: whole, or as SSE events."""

    id: str

    def response(self, finals: list[RequestOutput], tracker: FinishedTracker) -> BaseModel: ...

    def events(self, tracker: FinishedTracker) -> AsyncIterator[str]: ...


async def respond(request: Request, tracker: FinishedTracker, view: ResponseView, streaming: bool) -> Response:
    """The response to an accepted submission. However it ends, requests that did not finish are
    aborted: here for a whole response, by the streaming response for a stream (even one that
    never starts because its client left first)."""
    headers = {"X-Request-Id": view.id}
    if streaming:
        return _EventStreamResponse(_guarded(view.events(tracker), tracker), tracker, headers)
    try:
        finals = await until_disconnect(request, tracker.run_to_end())
    except ClientDisconnected:
        return Response(status_code=499)  # nobody reads it; the access log does
    finally:
        tracker.close()
    return json_response(view.response(finals, tracker), headers=headers)


class ClientDisconnected(Exception):
    """The client went away before its whole response was ready."""


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await work, but cancel it as soon as the client disconnects: a whole (non-streaming)
    response is otherwise generated to the end for nobody."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
        watcher.cancel()
    try:
        return await task
    except asyncio.CancelledError:
        if watcher.cancelled() or not watcher.done():
            raise  # we were cancelled ourselves
        raise ClientDisconnected() from None


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class _StalledClient(Exception):
    """The client accepted no data for the stall timeout."""


class _EventStreamResponse(StreamingResponse):
    """An SSE response whose requests are aborted however it ends, including when its client
    stops reading: a send that cannot complete within the stall timeout ends the stream (the
    connection is closed) instead of holding the request's KV space for ever."""

    def __init__(self, events: AsyncIterator[str], tracker: FinishedTracker, headers: dict[str, str]) -> None:
        super().__init__(events, media_type="text/event-stream", headers={**SSE_HEADERS, **headers})
        self._tracker = tracker

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        timeout_s = self._tracker.ctx.settings.stream_stall_timeout_s

        async def stall_guarded_send(message: dict) -> None:
            try:
                await asyncio.wait_for(send(message), timeout_s)
            except asyncio.TimeoutError:
                raise _StalledClient() from None

        try:
            await super().__call__(scope, receive, stall_guarded_send)
        except _StalledClient:
            logger.warning("aborting a stream whose client accepted no data for %.0f s", timeout_s)
            self._tracker.ctx.metrics.stalled_streams.inc()
        finally:  # a client that disconnects cancels the stream: abort its requests now
            self._tracker.close()


async def _guarded(events: AsyncIterator[str], tracker: FinishedTracker) -> AsyncIterator[str]:
    """An engine error mid-stream becomes an error event (the 200 is already sent), and a stream
    that was not cut off always ends with [DONE]."""
    try:
        async for event in events:
            yield event
    except Exception as exc:
        yield sse(from_exception(exc).body())
    tracker.close()
    yield SSE_DONE
