"""A tiny OpenAI-style streaming completions server (standard library only) for client tests.

It streams one SSE chunk per token, `TOKEN_DELAY_S` apart, then a usage chunk and `[DONE]`, and
records every request body, the most requests it saw in flight at once, and (on the same
`time.perf_counter` clock as the client, in this process) when each request arrived and when each
chunk was about to be written: tests assert causality against these, never durations.
"""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TOKEN_DELAY_S = 0.01
FAIL_MAX_TOKENS = 13  # a request asking for this many tokens gets HTTP 500


class FakeState:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.bodies: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.received_at: dict[str, float] = {}  # str(prompt) -> when the body was read
        self.chunk_times: dict[str, list[float]] = {}  # str(prompt) -> before each token chunk was written


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # the body ends when the connection closes: no chunked framing
    state: FakeState

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:
        if self.path == "/v1/models":
            self._json(200, {"object": "list", "data": [{"id": "fake-model", "object": "model"}]})
        elif self.path == "/health":
            self._json(200, {"status": "ok"})
        else:
            self._json(404, {"error": "not found"})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        received = time.perf_counter()
        st = self.state
        key = str(body.get("prompt"))
        with st.lock:
            st.bodies.append(body)
            st.received_at[key] = received
            st.chunk_times[key] = []
            st.in_flight += 1
            st.max_in_flight = max(st.max_in_flight, st.in_flight)
        try:
            n = int(body["max_tokens"])
            if n == FAIL_MAX_TOKENS:
                self._json(500, {"error": {"message": "boom"}})
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            prompt_len = len(body["prompt"]) if isinstance(body["prompt"], list) else len(body["prompt"].split())
            for i in range(n):
                time.sleep(TOKEN_DELAY_S)
                st.chunk_times[key].append(time.perf_counter())
                self._event({"id": "c", "object": "text_completion", "choices": [{"index": 0, "text": f"t{i} "}]})
            self._event({"id": "c", "choices": [], "usage": {"prompt_tokens": prompt_len, "completion_tokens": n,
                                                             "total_tokens": prompt_len + n}})
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        finally:
            with st.lock:
                st.in_flight -= 1

    def _event(self, payload: dict) -> None:
        self.wfile.write(b"data: " + json.dumps(payload).encode() + b"\n\n")
        self.wfile.flush()

    def _json(self, code: int, payload: dict) -> None:
        raw = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)


def start_fake_server() -> tuple[ThreadingHTTPServer, FakeState, str]:
    state = FakeState()
    handler = type("Handler", (_Handler,), {"state": state})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, state, f"http://127.0.0.1:{server.server_address[1]}"
