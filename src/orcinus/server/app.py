"""The OpenAI-compatible HTTP server: the FastAPI app (`create_app`) and `orcinus serve` (`run_server`)."""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import time
from typing import AsyncIterator, Iterator

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from orcinus import __version__
from orcinus.config import EngineConfig
from orcinus.engine.async_engine import AsyncEngine, Health
from orcinus.server.protocol_structured import (DetokenizeRequest, DetokenizeResponse, TokenizeRequest,
                                                TokenizeResponse)
from orcinus.server.serving_tokenize import detokenize, tokenize
from orcinus.server.errors import OpenAIError, install_error_handlers
from orcinus.server.metrics import ServerMetrics
from orcinus.server.body_precheck import GenerationBodyPrecheck
from orcinus.server.connection_guard import guarded_protocol
from orcinus.server.middleware import AccessLog, ApiKeyAuth, BodySizeLimit, BodyTimeout, Draining, DrainState
from orcinus.server.protocol import (ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse,
                                     CompletionChunk, CompletionRequest, CompletionResponse, ErrorResponse,
                                     HealthResponse, ModelCard, ModelList, VersionResponse)
from orcinus.server.serving import ClientDisconnected, ServingContext, json_response
from orcinus.server.serving_chat import create_chat_completion
from orcinus.server.serving_completions import create_completion
from orcinus.server.settings import ServerSettings, add_serve_args, settings_from_args
from orcinus.server.stats_logger import log_stats_forever

__all__ = ["add_serve_args", "create_app", "run_server"]

logger = logging.getLogger("orcinus.server")

_BACKSTOP_S = 5
_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 408, 413, 500, 503)}


def _generation_responses(model: type, chunk: type) -> dict:
    """OpenAPI: a JSON object, or with stream=true an SSE stream: `data: <chunk JSON>` events
    (an error event has ErrorResponse's shape), ending with `data: [DONE]`."""
    stream = {"schema": {"type": "string", "description": f"Server-sent events: `data: {{{chunk.__name__}}}` "
                                                          "lines, `data: {ErrorResponse}` on a failure mid-stream, "
                                                          "then `data: [DONE]`",
                         "x-sse-data": {"oneOf": [{"$ref": f"#/components/schemas/{chunk.__name__}"},
                                                  {"$ref": "#/components/schemas/ErrorResponse"},
                                                  {"const": "[DONE]"}]}}}
    return {200: {"model": model, "content": {"text/event-stream": stream}}, **_ERRORS}


def _with_chunk_schemas(app: FastAPI, *models: type) -> None:
    """Put the stream chunk models into the OpenAPI components, where x-sse-data refers to them."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in models:
                defs = model.model_json_schema(ref_template="#/components/schemas/{model}")
                for name, sub in defs.pop("$defs", {}).items():
                    components.setdefault(name, sub)
                components.setdefault(model.__name__, defs)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def create_app(engine: AsyncEngine, settings: ServerSettings, drain: DrainState | None = None) -> FastAPI:
    """The app over an AsyncEngine; starting it (lifespan) starts the engine loop, stopping it
    aborts what is left and stops the loop. Setting drain.draining turns new requests away."""
    drain = drain or DrainState()
    metrics = ServerMetrics(engine, settings.served_model_names[0])
    ctx = ServingContext(engine, metrics, settings)
    started_at = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        stats_task = None
        if settings.log_stats_interval_s > 0:
            stats_task = asyncio.create_task(log_stats_forever(engine, settings.log_stats_interval_s))
        try:
            yield
        finally:
            if stats_task is not None:
                stats_task.cancel()
            await engine.shutdown()

    app = FastAPI(title="orcinus", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible server over an iteration-level (Orca) scheduling engine.")
    install_error_handlers(app)
    _with_chunk_schemas(app, CompletionChunk, ChatCompletionChunk)
    # add_middleware wraps: the last added runs first. Order: log, turn away while draining,
    # authenticate, bound the body's time and size.
    # Innermost: a generation body, bounded in size and time by the two outside it, is checked
    # from its bytes before the app parses it (body_precheck.py).
    app.add_middleware(GenerationBodyPrecheck,
                       limits=lambda: (engine.max_model_len, ctx.max_prompt_chars))
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)
    app.add_middleware(BodyTimeout, timeout_s=settings.body_timeout_s)
    if settings.api_key:
        # Everything but /health needs the key (Prometheus scrapes with a bearer token), unless
        # the operator opens /metrics explicitly.
        app.add_middleware(ApiKeyAuth, api_key=settings.api_key,
                           open_paths=("/health", "/metrics") if settings.public_metrics else ("/health",))
    app.add_middleware(Draining, state=drain)
    if settings.access_log:
        app.add_middleware(AccessLog)
    # The model's file name only: its absolute path would tell clients about the host.
    model_root = os.path.basename(os.path.normpath(engine.model_path)) if engine.model_path else None

    def model_card(name: str) -> ModelCard:
        return ModelCard(id=name, created=started_at, root=model_root, max_model_len=engine.max_model_len)

    @app.post("/v1/completions", response_model=None,
              responses=_generation_responses(CompletionResponse, CompletionChunk), tags=["openai"])
    async def completions(body: CompletionRequest, request: Request) -> Response:
        try:
            return await create_completion(ctx, body, request)
        except ClientDisconnected:
            return Response(status_code=499)  # nobody reads it; the access log does

    @app.post("/v1/chat/completions", response_model=None,
              responses=_generation_responses(ChatCompletionResponse, ChatCompletionChunk), tags=["openai"])
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        try:
            return await create_chat_completion(ctx, body, request)
        except ClientDisconnected:
            return Response(status_code=499)

    @app.post("/tokenize", response_model=TokenizeResponse, responses=_ERRORS, tags=["vllm"])
    async def tokenize_route(body: TokenizeRequest) -> TokenizeResponse:
        return await tokenize(ctx, body)

    @app.post("/detokenize", response_model=DetokenizeResponse, responses=_ERRORS, tags=["vllm"])
    async def detokenize_route(body: DetokenizeRequest) -> DetokenizeResponse:
        return await detokenize(ctx, body)

    @app.get("/v1/models", response_model=ModelList, responses=_ERRORS, tags=["openai"])
    async def list_models() -> ModelList:
        return ModelList(data=[model_card(name) for name in settings.served_model_names])

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=_ERRORS, tags=["openai"])
    async def get_model(model_id: str) -> ModelCard:
        if model_id not in settings.served_model_names:
            raise OpenAIError(404, f"the model {model_id!r} does not exist here", param="model",
                              code="model_not_found")
        return model_card(model_id)

    @app.get("/health", response_model=HealthResponse, responses={503: {"model": HealthResponse}}, tags=["ops"])
    async def health() -> Response:
        h = engine.health()
        if drain.draining and h.ok:
            h = Health(False, "the server is shutting down")
        body = HealthResponse(status="ok" if h.ok else "unhealthy", reason=h.reason or None)
        response = json_response(body)
        response.status_code = 200 if h.ok else 503
        return response

    @app.get("/metrics", response_class=Response, tags=["ops"],
             responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}})
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/version", response_model=VersionResponse, tags=["ops"])
    async def version() -> VersionResponse:
        return VersionResponse(version=__version__)

    return app


class _Server(uvicorn.Server):
    """uvicorn with two changes to its shutdown.

    - Requests still running when the grace period ends are aborted through the engine, so that
      each ends properly (an error event and [DONE] on a stream, a 503 otherwise) before uvicorn
      would cancel their tasks mid-response.
    - uvicorn re-raises SIGTERM/SIGINT after its graceful shutdown, so the process dies of the
      signal; a graceful stop is a success, so handle the signals and let run() return.
    """

    def __init__(self, config: uvicorn.Config, engine: AsyncEngine, grace_s: float, drain: DrainState) -> None:
        super().__init__(config)
        self.engine = engine
        self.grace_s = grace_s
        self.drain = drain
        self.engine_dead = False

    def on_engine_dead(self, reason: str) -> None:
        """From the engine thread: the engine is broken for good; stop serving and exit non-zero
        so that a supervisor restarts the process (rather than answer 503 for ever)."""
        self.engine_dead = True
        self.should_exit = True

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # Keep listening while requests in flight finish: a new request gets a 503 it can act
        # on (retry elsewhere) instead of a refused connection.
        self.drain.draining = True
        timer = asyncio.create_task(self._abort_after_grace())
        try:
            await self._drain_in_flight()
            await super().shutdown(sockets)
        finally:
            timer.cancel()

    async def _drain_in_flight(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.grace_s + _BACKSTOP_S
        if self.drain.in_flight:
            logger.info("shutdown: new requests get 503; waiting for %d request(s) in flight", self.drain.in_flight)
        while self.drain.in_flight and loop.time() < deadline and not self.force_exit:
            await asyncio.sleep(0.05)

    async def _abort_after_grace(self) -> None:
        await asyncio.sleep(self.grace_s)
        if self.server_state.tasks:
            logger.warning("shutdown: aborting the requests still running after %.0f s", self.grace_s)
            self.engine.abort_all("the server is shutting down")

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        sigs = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in sigs}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _bind(host: str, port: int) -> socket.socket:
    """Bind before the model loads, so a taken port fails in a second, not after the load.
    No listen() yet: until the server runs, connections are refused rather than left hanging."""
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                      flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def run_server(engine_config: EngineConfig, args: argparse.Namespace) -> int:
    """`orcinus serve`: load the model, serve until SIGTERM/Ctrl-C, return the exit code."""
    from orcinus.engine.llm_engine import LLMEngine

    try:
        settings = settings_from_args(args, engine_config.model)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        sock = _bind(settings.host, settings.port)
    except OSError as exc:
        print(f"error: cannot listen on {settings.host}:{settings.port}: {exc}", file=sys.stderr)
        return 2
    host, port = sock.getsockname()[:2]
    engine = LLMEngine(engine_config)
    drain = DrainState()
    async_engine = AsyncEngine(engine, settings.max_waiting_requests, settings.health_stall_timeout_s)
    app = create_app(async_engine, settings, drain)
    # uvicorn's own deadline is only the backstop for requests that do not end once aborted.
    config = uvicorn.Config(app, log_config=None, access_log=False, log_level=settings.uvicorn_log_level,
                            timeout_graceful_shutdown=round(settings.shutdown_timeout_s) + _BACKSTOP_S,
                            timeout_keep_alive=settings.timeout_keep_alive_s, server_header=False,
                            limit_concurrency=settings.limit_concurrency,
                            http=guarded_protocol(settings.header_timeout_s))
    server = _Server(config, async_engine, settings.shutdown_timeout_s, drain)
    async_engine.on_dead = server.on_engine_dead
    url_host = f"[{host}]" if ":" in host else host
    logger.info("serving %s at http://%s:%d (API key %s, waiting bound %s, body limit %d bytes, "
                "at most %d tokens per iteration, connection limit %s)",
                ", ".join(settings.served_model_names), url_host, port,
                "required" if settings.api_key else "not required",
                settings.max_waiting_requests or "none", settings.max_request_bytes,
                engine.scheduler.max_num_batched_tokens, settings.limit_concurrency or "none")
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if not server.started:
        return 1
    if server.engine_dead:
        logger.critical("server stopped because the engine is dead; exiting with status 1")
        return 1
    logger.info("server stopped")
    return 0
