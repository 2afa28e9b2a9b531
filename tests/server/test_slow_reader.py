"""A client that stops reading its stream (issue 8, item 6): the server keeps at most the newest
output of each request for it, not one per iteration, and aborts the stream once the client has
accepted nothing for --stream-stall-timeout, freeing its KV space.

A server of its own on a tiny random-weight checkpoint without a tokenizer: it produces tokens
fast enough to fill the socket buffers between server and client in seconds.
"""
from __future__ import annotations

import json
import socket
from typing import Iterator

import httpx
import pytest

from orcinus.bench.server_process import ServerProcess
from server_helpers import metric, start_server, stop_server, wait_until

N, MAX_TOKENS = 64, 480


@pytest.fixture(scope="module")
def tiny(checkpoint_factory, tmp_path_factory) -> Iterator[ServerProcess]:
    folder, _ = checkpoint_factory("llama")
    log = tmp_path_factory.mktemp("slow-reader") / "server.log"
    srv = start_server(log, "--model", folder, "--skip-tokenizer-init", "--stream-stall-timeout", "2",
                       "--max-num-seqs", str(N))
    yield srv
    assert stop_server(srv) == 0


def _metrics(srv: ServerProcess) -> str:
    return httpx.get(srv.base_url + "/metrics", timeout=10).text


def test_a_client_that_stops_reading_is_bounded_then_aborted(tiny: ServerProcess) -> None:
    # n=64 with 20 log-probs per token: ~20 MB of events if it ran to the end, far beyond what
    # the kernel buffers between the two sockets hold.
    body = json.dumps({"prompt": [5, 6, 7], "max_tokens": MAX_TOKENS, "ignore_eos": True, "stream": True,
                       "n": N, "logprobs": 20}).encode()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window: the server must wait on us
    sock.connect(("127.0.0.1", tiny.port))
    buffered: list[float] = []
    try:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)

        def aborted() -> bool:
            text = _metrics(tiny)
            buffered.append(metric(text, "orcinus:stream_buffered_outputs"))
            return metric(text, "orcinus:stalled_streams_aborted_total") == 1

        assert wait_until(aborted, 120, interval_s=0.1)
    finally:
        sock.close()
    assert max(buffered) <= 1  # one request group: at most its newest output, however far behind
    text = _metrics(tiny)
    assert metric(text, "orcinus:generation_tokens_total") < N * MAX_TOKENS  # cut short
    assert wait_until(lambda: metric(_metrics(tiny), "orcinus:kv_cache_free_blocks")
                      == metric(_metrics(tiny), "orcinus:kv_cache_total_blocks"), 30)
    assert "aborting a stream whose client accepted no data for 2 s" in open(tiny.log_path).read()
    # The server goes on serving.
    resp = httpx.post(tiny.base_url + "/v1/completions", json={"prompt": [1, 2], "max_tokens": 2}, timeout=60)
    assert resp.status_code == 200
