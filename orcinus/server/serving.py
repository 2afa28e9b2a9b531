"""What the completions and chat endpoints share: model-name checks, submitting to the engine,
following a submission to its end (with the client's disconnect aborting it), SSE framing."""
from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, TypeVar

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel

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


def sse(payload: BaseModel) -> str:
    # pydantic writes a non-finite float as null; json.dumps would write invalid JSON.
    return f"data: {payload.model_dump_json()}\n\n"


def json_response(payload: BaseModel, headers: dict[str, str] | None = None) -> Response:
    return Response(payload.model_dump_json(), media_type="application/json", headers=headers)


class ClientDisconnected(Exception):
    """The client went away before its non-streaming response was ready."""


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
        """Refuse what the schema cannot: an unknown model name, features we do not implement."""
        if body.model and body.model not in self.settings.served_model_names:
            raise OpenAIError(404, f"the model {body.model!r} does not exist here; this server serves "
                                   f"{', '.join(map(repr, self.settings.served_model_names))}",
                              param="model", code="model_not_found")
        if body.logit_bias:
            raise OpenAIError(400, "logit_bias is not supported", param="logit_bias")
        extra = set(body.model_extra or {}) - self._warned_fields
        if extra:
            self._warned_fields |= extra
            logger.warning("ignoring request fields this server does not know: %s", ", ".join(sorted(extra)))

    async def submit(self, requests: list[GenerateRequest]) -> RequestStream:
        try:
            return await self.engine.submit(requests)
        except (asyncio.CancelledError, KeyboardInterrupt):
            raise
        except Exception as exc:
            raise from_exception(exc) from exc


def new_request_id(prefix: str, request: Request) -> str:
    """The client's X-Request-Id when it sent a sane one (ties logs together), else a fresh id."""
    given = request.headers.get("x-request-id", "")
    if 0 < len(given) <= 128 and given.isprintable():
        return f"{prefix}-{given}-{uuid.uuid4().hex[:8]}"
    return f"{prefix}-{uuid.uuid4().hex}"


class FinishedTracker:
    """Follows a submission to its end: records metrics once per finished request, aborts (and
    counts) whatever had not finished when the consumer stops."""

    def __init__(self, ctx: ServingContext, stream: RequestStream, num_seqs_per_request: int) -> None:
        self.ctx = ctx
        self.stream = stream
        self.n = num_seqs_per_request
        self.final: dict[str, RequestOutput] = {}
        self.latest: dict[str, RequestOutput] = {}

    def see(self, out: RequestOutput) -> None:
        self.latest[out.request_id] = out
        if out.finished and out.request_id not in self.final:
            self.final[out.request_id] = out
            self.ctx.metrics.observe_finished(out)

    def close(self) -> None:
        unfinished = [rid for rid in self.stream.request_ids if rid not in self.final]
        if unfinished:
            self.stream.close()
            self.ctx.metrics.observe_aborted(len(unfinished) * self.n)

    def usage(self) -> UsageInfo:
        outs = self.latest.values()
        prompt = sum(len(o.prompt_token_ids) for o in outs)
        completion = sum(len(c.token_ids) for o in outs for c in o.outputs)
        return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    async def run_to_end(self) -> list[RequestOutput]:
        """All final outputs, in submission order."""
        try:
            async for out in self.stream:
                self.see(out)
        finally:
            self.close()
        return [self.final[rid] for rid in self.stream.request_ids]


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await work, but cancel it (its finally blocks abort the engine requests) as soon as the
    client disconnects: a non-streaming request otherwise runs to the end for nobody."""
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


def streaming_response(events: AsyncIterator[str], request_id: str) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream", headers={**SSE_HEADERS, "X-Request-Id": request_id})


async def guarded_events(events: AsyncIterator[str], tracker: FinishedTracker) -> AsyncIterator[str]:
    """SSE events of a stream; an engine error mid-stream becomes an error event (the status is
    already sent), and the stream always ends with [DONE]. Disconnect cancels us: abort."""
    try:
        async for event in events:
            yield event
    except (asyncio.CancelledError, GeneratorExit):
        raise
    except Exception as exc:
        yield sse(from_exception(exc).body())
    finally:
        tracker.close()
    yield SSE_DONE

