"""Server settings (not engine settings: those are EngineConfig) and their command-line flags."""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

API_KEY_ENV = "ORCINUS_API_KEY"


@dataclass
class ServerSettings:
    served_model_names: list[str] = field(default_factory=lambda: ["orcinus"])
    host: str = "127.0.0.1"  # loopback unless the operator decides otherwise
    port: int = 8000
    api_key: str | None = None
    # With an API key, /metrics needs it too unless this is set (its counters tell about other
    # clients' prompts); /health never needs it.
    public_metrics: bool = False
    # Sequences allowed to wait for admission; beyond it new requests get 503 at once.
    max_waiting_requests: int | None = 512
    max_request_bytes: int = 8 * 1024 * 1024
    # max_tokens of a chat request that gives none (None: whatever the context leaves). A bound,
    # so that a chat that never samples its end token cannot run the whole context on a CPU.
    default_max_tokens: int | None = 512
    # After SIGTERM/Ctrl-C: how long in-flight requests may take to finish before being aborted.
    shutdown_timeout_s: float = 30.0
    # /health turns 503 when the engine loop has not come round for this long.
    health_stall_timeout_s: float = 60.0
    log_stats_interval_s: float = 10.0
    access_log: bool = True
    uvicorn_log_level: str = "info"
    timeout_keep_alive_s: int = 5
    # Per request: samples per prompt, and prompts (a completions request may hold a list).
    max_n: int = 128
    max_prompts_per_request: int = 256
    # A stream whose client accepts no data for this long is aborted (its KV space freed).
    stream_stall_timeout_s: float = 60.0
    # Connections (and requests) served at once; beyond it uvicorn answers 503. None: no bound.
    limit_concurrency: int | None = 1024
    # A connection must deliver a request's headers within header_timeout_s of its first byte
    # (or of opening), and its body within body_timeout_s: slow clients cannot hold sockets.
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    # How tool calls are read back from a model's text when tool_choice is "auto" (issue 20).
    tool_call_parser: str = "json"

    def __post_init__(self) -> None:
        if not self.served_model_names or not all(self.served_model_names):
            raise ValueError("served_model_names needs at least one non-empty name")
        if self.max_waiting_requests is not None and self.max_waiting_requests < 1:
            raise ValueError("max_waiting_requests must be at least 1 (or None for no bound)")
        if self.max_request_bytes < 1024:
            raise ValueError("max_request_bytes must be at least 1024")
        if self.default_max_tokens is not None and self.default_max_tokens < 1:
            raise ValueError("default_max_tokens must be at least 1")
        if not 0 <= self.port <= 65535:
            raise ValueError("port must be in [0, 65535]")
        if self.api_key == "":
            self.api_key = None
        if not 1 <= self.max_n <= 128:
            raise ValueError("max_n must be in [1, 128]")
        if not 1 <= self.max_prompts_per_request <= 256:
            raise ValueError("max_prompts_per_request must be in [1, 256]")
        if self.limit_concurrency is not None and self.limit_concurrency < 1:
            raise ValueError("limit_concurrency must be at least 1 (or None for no bound)")
        for name in ("stream_stall_timeout_s", "header_timeout_s", "body_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")


def default_model_name(model: str | None) -> str:
    """What clients call the model when --served-model-name is not given: the name the user
    passed with --model, or the default model's file name without its extensions."""
    if model:
        return model
    from orcinus.models.loader import default_model_path

    try:
        name = os.path.basename(default_model_path())
    except FileNotFoundError:
        return "default"
    name = name.removesuffix(".gguf")
    return name.split(".")[0] if "." in name else name  # SmolLM2-135M-Instruct.Q4_1 -> SmolLM2-135M-Instruct


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("server")
    d = ServerSettings()
    g.add_argument("--host", default=d.host, help="address to bind (default: loopback only; 0.0.0.0 for all)")
    g.add_argument("--port", type=int, default=d.port, help="port to bind (0: any free port)")
    g.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                   help=f"require 'Authorization: Bearer KEY' on every path but /health, /metrics included "
                        f"(default: ${API_KEY_ENV})")
    g.add_argument("--public-metrics", action="store_true",
                   help="with --api-key, let /metrics be read without the key (it reveals other clients' "
                        "prefix-cache hits: only where every client is trusted)")
    g.add_argument("--served-model-name", nargs="+", default=None,
                   help="name(s) clients use for the model; the first is reported in responses "
                        "(default: the --model value, or the default model's name)")
    g.add_argument("--max-waiting-requests", type=int, default=d.max_waiting_requests,
                   help="sequences that may wait for admission; beyond it, 503 at once (0: no bound)")
    g.add_argument("--max-request-bytes", type=int, default=d.max_request_bytes,
                   help="largest request body accepted; larger bodies get 413")
    g.add_argument("--default-max-tokens", type=int, default=d.default_max_tokens,
                   help="max_tokens for chat requests that give none, when the model's generation config sets "
                        "none or more (default: %(default)s; 0: up to the context length)")
    g.add_argument("--shutdown-timeout", type=float, default=d.shutdown_timeout_s,
                   help="seconds in-flight requests get to finish after SIGTERM/Ctrl-C before they are aborted")
    g.add_argument("--health-stall-timeout", type=float, default=d.health_stall_timeout_s,
                   help="/health answers 503 when the engine loop has made no progress for this many seconds")
    g.add_argument("--log-stats-interval", type=float, default=d.log_stats_interval_s,
                   help="seconds between throughput/queue log lines while busy (0: never)")
    g.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=d.access_log,
                   help="one log line per HTTP request")
    g.add_argument("--uvicorn-log-level", default=d.uvicorn_log_level,
                   choices=["critical", "error", "warning", "info", "debug", "trace"])
    g.add_argument("--timeout-keep-alive", type=int, default=d.timeout_keep_alive_s,
                   help="seconds an idle keep-alive connection stays open")
    g.add_argument("--max-n", type=int, default=d.max_n, help="largest n (samples per prompt) a request may ask for")
    g.add_argument("--max-prompts-per-request", type=int, default=d.max_prompts_per_request,
                   help="most prompts one completions request may hold")
    g.add_argument("--stream-stall-timeout", type=float, default=d.stream_stall_timeout_s,
                   help="seconds a streaming client may accept no data before its stream is aborted")
    g.add_argument("--limit-concurrency", type=int, default=d.limit_concurrency,
                   help="connections and requests served at once; beyond it, 503 (0: no bound)")
    g.add_argument("--header-timeout", type=float, default=d.header_timeout_s,
                   help="seconds a connection has to send a request's headers before it is closed")
    g.add_argument("--body-timeout", type=float, default=d.body_timeout_s,
                   help="seconds a client has to send a request's body before it gets 408")
    g.add_argument("--tool-call-parser", default=d.tool_call_parser, choices=["json", "hermes", "llama3_json"],
                   help="how tool calls are read from the model's text for tool_choice 'auto': 'json' (the "
                        "generic JSON reply the server asks for when the chat template has no tool format), "
                        "'hermes' (<tool_call>...</tool_call>), 'llama3_json'")


def settings_from_args(args: argparse.Namespace, model: str | None) -> ServerSettings:
    return ServerSettings(
        served_model_names=args.served_model_name or [default_model_name(model)],
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        public_metrics=args.public_metrics,
        max_waiting_requests=args.max_waiting_requests or None,
        max_request_bytes=args.max_request_bytes,
        default_max_tokens=args.default_max_tokens or None,
        shutdown_timeout_s=args.shutdown_timeout,
        health_stall_timeout_s=args.health_stall_timeout,
        log_stats_interval_s=args.log_stats_interval,
        access_log=args.access_log,
        uvicorn_log_level=args.uvicorn_log_level,
        timeout_keep_alive_s=args.timeout_keep_alive,
        max_n=args.max_n,
        max_prompts_per_request=args.max_prompts_per_request,
        stream_stall_timeout_s=args.stream_stall_timeout,
        limit_concurrency=args.limit_concurrency or None,
        header_timeout_s=args.header_timeout,
        body_timeout_s=args.body_timeout,
        tool_call_parser=args.tool_call_parser,
    )
