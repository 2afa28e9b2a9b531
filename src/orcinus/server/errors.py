"""Every failure leaves the server as OpenAI's error body: {"error": {message, type, param, code}}.

Client mistakes are 4xx with a message that says what to change; only our own faults are 5xx
(and an overloaded or stopping engine, 503). Validation errors are 400, as OpenAI and vLLM
answer them, not FastAPI's 422.
"""
from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from orcinus.errors import EngineStepError, EngineUnavailable, QueueFull, RequestRejected, SamplingParamsError
from orcinus.structured.params import GrammarError
from orcinus.server.protocol import ErrorInfo, ErrorResponse

logger = logging.getLogger(__name__)

INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"
UNAVAILABLE = "service_unavailable_error"

# Union branches show up in pydantic's error locations; they mean nothing to a client.
_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none", "tuple"}


class OpenAIError(Exception):
    """An error with the status and body the client should see."""

    def __init__(self, status: int, message: str, type: str = INVALID_REQUEST, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code))

    def response(self) -> JSONResponse:
        return JSONResponse(self.body().model_dump(), status_code=self.status, headers=self.headers)


def from_exception(exc: BaseException) -> OpenAIError:
    """What a client should be told about an exception raised while serving its request."""
    if isinstance(exc, OpenAIError):
        return exc
    if isinstance(exc, (RequestRejected, SamplingParamsError)):
        return OpenAIError(400, str(exc), param=exc.param)
    if isinstance(exc, QueueFull):
        return OpenAIError(503, str(exc), UNAVAILABLE, code="queue_full", headers={"Retry-After": "1"})
    if isinstance(exc, EngineUnavailable):
        return OpenAIError(503, str(exc), UNAVAILABLE, code="engine_unavailable")
    if isinstance(exc, EngineStepError):
        return OpenAIError(500, str(exc), SERVER_ERROR)
    if isinstance(exc, ValueError):  # e.g. a tokenizer with no chat template, a grammar that does not compile
        return OpenAIError(400, str(exc), param=getattr(exc, "param", None))
    logger.error("unexpected error while serving a request", exc_info=exc)
    return OpenAIError(500, f"internal server error: {type(exc).__name__}", SERVER_ERROR)


def validation_error(errors: list[dict[str, Any]]) -> OpenAIError:
    """One readable message from pydantic's list of errors (the first one, and how many more)."""
    if not errors:
        return OpenAIError(400, "invalid request")
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return OpenAIError(400, f"the request body is not valid JSON: {detail}".rstrip(": "))
    loc = [str(x) for x in first.get("loc", ()) if x != "body" and str(x).lower() not in _TYPE_TAGS
           and (isinstance(x, int) or str(x).isidentifier())]
    if first.get("type") == "missing" and not loc:
        return OpenAIError(400, "the request needs a JSON body")
    where = ".".join(loc)
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    more = len({tuple(e.get("loc", ())[:2]) for e in errors}) - 1
    text = f"{where}: {msg}" if where else msg
    if more > 0:
        text += f" (and {more} more problem{'s' if more > 1 else ''})"
    return OpenAIError(400, text, param=loc[0] if loc else None)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def _openai(_: Request, exc: OpenAIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(list(exc.errors())).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status_code)
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route {request.url.path}; see /docs for the API"
        kind = INVALID_REQUEST if exc.status_code < 500 else SERVER_ERROR
        return OpenAIError(exc.status_code, message, kind, code=code, headers=getattr(exc, "headers", None)).response()

    async def _known(_: Request, exc: Exception) -> JSONResponse:
        return from_exception(exc).response()

    # Handlers for specific classes run inside the app; one for Exception would run in the
    # outermost middleware, which re-raises after answering and makes uvicorn drop the connection.
    for known in (RequestRejected, SamplingParamsError, QueueFull, EngineUnavailable, EngineStepError, GrammarError):
        app.add_exception_handler(known, _known)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        return from_exception(exc).response()
