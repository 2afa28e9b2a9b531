"""RequestStream: what the engine thread hands one submission's consumer, on its event loop.

Outputs are cumulative (each holds the request's whole text so far), so only the newest output
of each request is worth keeping until the consumer takes it: an older one still waiting is
replaced, never queued behind. A consumer that falls behind, or stops reading altogether, thus
holds at most one output per request, instead of one per iteration (whose sizes grow with the
text: quadratic memory).
"""
from __future__ import annotations

import asyncio
from typing import Any, Callable

from orcinus.request import RequestOutput

END = object()  # queued to a stream once all of its requests have finished


class RequestStream:
    """The outputs of one submission (one or more engine requests), in the order they arrive.

    Outputs are cumulative, so when the consumer falls behind only the newest output of each
    request is worth handing over: an older one still waiting is replaced, never queued behind.
    What waits is thus at most one output per request, however long the consumer stalls.
    `close()` aborts whatever has not finished (call it when the client goes away).
    """

    def __init__(self, request_ids: list[str], loop: asyncio.AbstractEventLoop,
                 abort: Callable[[list[str]], None], forget: Callable[["RequestStream"], None]) -> None:
        """abort(ids) aborts requests in the engine; forget(stream) drops the stream from the
        engine's accounting once it has ended or been closed."""
        self.request_ids = request_ids
        self._abort = abort
        self._forget = forget
        self.loop = loop  # the consumer's event loop: outputs are handed over on it
        self._ready: dict[str, RequestOutput] = {}  # newest output per request, oldest request first
        self._wakeup = asyncio.Event()
        self._unfinished = set(request_ids)
        self._done = False
        self._closed = False
        self._error: BaseException | None = None

    @property
    def num_buffered(self) -> int:
        """Outputs waiting for the consumer (at most one per request)."""
        return len(self._ready)

    # -- engine thread side (through call_soon_threadsafe) --------------------------------------
    def _push(self, item: Any) -> None:
        if self._closed:
            return  # nobody will read it
        if item is END:
            self._done = True
        elif isinstance(item, BaseException):
            self._error = item
            self._done = True
        else:
            if item.finished:
                self._unfinished.discard(item.request_id)
            self._ready[item.request_id] = item  # replaces an older output of the same request
        self._wakeup.set()

    # -- consumer side --------------------------------------------------------------------------
    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        while not self._ready:
            if self._error is not None:
                self._forget(self)
                raise self._error
            if self._done:
                self._forget(self)
                raise StopAsyncIteration
            self._wakeup.clear()
            await self._wakeup.wait()
        return self._ready.pop(next(iter(self._ready)))

    def close(self) -> None:
        """Abort every request of this stream that has not finished, and drop what its consumer
        has not taken; safe to call twice."""
        self._closed = True
        self._ready.clear()
        self._forget(self)
        if self._unfinished:
            self._abort(list(self._unfinished))
            self._unfinished.clear()
