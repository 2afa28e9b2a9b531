"""Plain ASGI middlewares, so that they work the same for streaming and ordinary responses.

- BodySizeLimit refuses request bodies above a size with 413: a declared Content-Length at once,
  before the body is read, and a chunked body as soon as the bytes received pass the limit.
- ApiKeyAuth demands `Authorization: Bearer <key>` on /v1/* before the body is even read, so an
  unauthenticated client cannot make the server parse anything.
- AccessLog writes one line per request when its response ends (streams included): client,
  method, path, status, bytes sent and duration.
"""
from __future__ import annotations

import logging
import secrets
import time

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
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge(self.max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge as exc:
            if started:
                raise
            await _send_error(send, _as_openai(exc))


class ApiKeyAuth:
    def __init__(self, app: ASGIApp, api_key: str, prefix: str = "/v1") -> None:
        self.app = app
        self._expected = f"Bearer {api_key}".encode()
        self.prefix = prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] != "OPTIONS" and _under(scope["path"], self.prefix):
            given = Headers(scope=scope).get("authorization", "").encode()
            # Constant-time comparison: response timing must not reveal how much of a key matched.
            if not secrets.compare_digest(given, self._expected):
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
            path = scope.get("path", "")
            if scope.get("query_string"):
                path += "?" + scope["query_string"].decode("latin-1")
            # 499 (nginx's "client closed request") when the client left before any response.
            access_logger.info('%s "%s %s HTTP/%s" %d %dB %.1fms', f"{client[0]}:{client[1]}" if client else "-",
                               scope.get("method", ""), path, scope.get("http_version", "1.1"), status or 499, sent,
                               (time.perf_counter() - start) * 1000)


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + "/")


def _as_openai(exc: HTTPException) -> OpenAIError:
    return OpenAIError(exc.status_code, str(exc.detail), code="request_too_large")


async def _send_error(send: Send, error: OpenAIError) -> None:
    body = error.body().model_dump_json().encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")]
    headers += [(k.lower().encode(), v.encode()) for k, v in (error.headers or {}).items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
