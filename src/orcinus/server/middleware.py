"""Plain ASGI middlewares, so that they work the same for streaming and ordinary responses.

- BodySizeLimit refuses request bodies above a size with 413: a declared Content-Length at once,
  before the body is read, and a chunked body as soon as the bytes received pass the limit.
- BodyTimeout answers 408 to a client that does not deliver its whole body within a deadline.
- ApiKeyAuth demands `Authorization: Bearer <key>` on every path but /health (and /metrics when
  the operator opens it) before the body is even read, so an unauthenticated client cannot make
  the server parse anything, nor read its metrics: the prefix-cache counters there told another
  client's secret prompt apart in a few guesses (issue 19).
- Draining answers 503 to new requests once the server is shutting down, while those in flight
  finish, and counts those in flight.
- AccessLog writes one line per request when its response ends (streams included): client,
  method, path, status, bytes sent and duration. Control characters in the path are escaped (a
  client must not be able to forge log lines) and credentials in the query string redacted.
"""
from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
from dataclasses import dataclass
from typing import Callable
from urllib.parse import parse_qsl, quote

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from orcinus.server.errors import OpenAIError

access_logger = logging.getLogger("orcinus.access")


class _BodyTooLarge(HTTPException):
    # An HTTPException, so that FastAPI passes it through its body parsing untouched and the
    # app's handler renders it; the middleware renders it itself if it escapes the app.
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than the server's limit of {limit} bytes")


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await _send_error(send, _as_openai(_BodyTooLarge(self.max_bytes)))
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge(self.max_bytes)
            return message

        await _run_or_answer(self.app, scope, limited_receive, send, _BodyTooLarge, _as_openai)


class _BodyTooSlow(HTTPException):
    def __init__(self, timeout_s: float) -> None:
        super().__init__(408, f"the request body did not arrive within {timeout_s:g} s")


class BodyTimeout:
    def __init__(self, app: ASGIApp, timeout_s: float) -> None:
        self.app = app
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        body_done = False

        async def timed_receive() -> Message:
            nonlocal body_done
            if body_done:  # afterwards receive() only waits for a disconnect, for as long as it takes
                return await receive()
            left = deadline - asyncio.get_running_loop().time()
            try:
                message = await asyncio.wait_for(receive(), max(left, 0.0))
            except asyncio.TimeoutError:
                raise _BodyTooSlow(self.timeout_s) from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        await _run_or_answer(self.app, scope, timed_receive, send, _BodyTooSlow,
                             lambda exc: OpenAIError(408, str(exc.detail), code="request_timeout"))


@dataclass
class DrainState:
    draining: bool = False  # set once the server is shutting down
    in_flight: int = 0  # requests being served


class Draining:
    """Once `draining` is set, new requests get 503 (and the connection is closed) instead of
    the connection refused they would get after the listener closes; /health and /metrics still
    answer. `in_flight` counts the requests being served."""

    def __init__(self, app: ASGIApp, state: DrainState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.state.draining and scope.get("path") not in ("/health", "/metrics"):
            error = OpenAIError(503, "the server is shutting down; retry on another instance",
                                "service_unavailable_error", code="shutting_down", headers={"Retry-After": "1"})
            return await _send_error(send, error)
        self.state.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.state.in_flight -= 1


class ApiKeyAuth:
    def __init__(self, app: ASGIApp, api_key: str, open_paths: tuple[str, ...] = ("/health",)) -> None:
        self.app = app
        self._expected = api_key.encode()
        self.open_paths = frozenset(open_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] != "OPTIONS" and scope["path"] not in self.open_paths:
            scheme, _, token = Headers(scope=scope).get("authorization", "").strip().partition(" ")
            # The scheme is case-insensitive (RFC 7235). Constant-time comparison of the key:
            # response timing must not reveal how much of it matched.
            key_ok = secrets.compare_digest(token.strip().encode("latin-1", "replace"), self._expected)
            if not (scheme.lower() == "bearer" and key_ok):
                error = OpenAIError(401, "a valid API key is required: send the header 'Authorization: Bearer "
                                         "<key>'", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                return await _send_error(send, error)
        await self.app(scope, receive, send)


class AccessLog:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = 0
        sent = 0

        async def logging_send(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, logging_send)
        finally:
            client = scope.get("client")
            path = escape_for_log(scope.get("path", ""))
            if scope.get("query_string"):
                path += "?" + redact_query(scope["query_string"].decode("latin-1"))
            # 499 (nginx's "client closed request") when the client left before any response.
            access_logger.info('%s "%s %s HTTP/%s" %d %dB %.1fms', f"{client[0]}:{client[1]}" if client else "-",
                               scope.get("method", ""), path, scope.get("http_version", "1.1"), status or 499, sent,
                               (time.perf_counter() - start) * 1000)


# Query parameters whose values are secrets: the name contains one of these words, or one of its
# parts (split at "_", "-", ".") is one of the short ones (which are too common inside other words).
_SECRET_WORDS = ("key", "token", "secret", "password", "passwd", "auth", "session", "signature", "credential",
                 "bearer")
_SECRET_PARTS = frozenset({"pwd", "pass", "sig", "pw", "jwt", "sas"})
_NAME_PARTS = re.compile(r"[_\-.\[\]]+")
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\\]")


def _escape(match: re.Match) -> str:
    char = match.group()
    if char == "\\":
        return "\\\\"
    return f"\\x{ord(char):02x}" if ord(char) < 256 else f"\\u{ord(char):04x}"


def escape_for_log(text: str, limit: int = 2048) -> str:
    """Text as one log line: control characters written as escapes (and backslashes doubled, so
    that an escape cannot be faked), long text cut."""
    if len(text) > limit:
        text = text[:limit] + "..."
    return _UNPRINTABLE.sub(_escape, text)


def redact_query(query: str) -> str:
    """The query string with the values of credential-like parameters replaced by '***'."""
    parts = []
    # ";" separates parameters too for many servers and frameworks: a secret after one must not
    # hide inside the previous parameter's value.
    for name, value in parse_qsl(query.replace(";", "&"), keep_blank_values=True):
        if _is_secret(name):
            value = "***"
        parts.append(f"{quote(name, safe='')}={quote(value, safe='*')}")
    return escape_for_log("&".join(parts))


def _is_secret(name: str) -> bool:
    lower = name.lower()
    return any(word in lower for word in _SECRET_WORDS) or not _SECRET_PARTS.isdisjoint(_NAME_PARTS.split(lower))


async def _run_or_answer(app: ASGIApp, scope: Scope, receive: Receive, send: Send,
                         error_type: type[HTTPException], render: Callable[[HTTPException], OpenAIError]) -> None:
    """Run the app; if it raises `error_type` before its response started, answer with the
    rendered OpenAI error instead (after the start, the connection can only be dropped)."""
    started = False

    async def tracking_send(message: Message) -> None:
        nonlocal started
        if message["type"] == "http.response.start":
            started = True
        await send(message)

    try:
        await app(scope, receive, tracking_send)
    except error_type as exc:
        if started:
            raise
        await _send_error(send, render(exc))


def _as_openai(exc: HTTPException) -> OpenAIError:
    return OpenAIError(exc.status_code, str(exc.detail), code="request_too_large")


async def send_error(send: Send, error: OpenAIError) -> None:
    """Answer with an OpenAI-style error and close the connection (for middlewares)."""
    await _send_error(send, error)


async def _send_error(send: Send, error: OpenAIError) -> None:
    body = error.body().model_dump_json().encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")]
    headers += [(k.lower().encode(), v.encode()) for k, v in (error.headers or {}).items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
