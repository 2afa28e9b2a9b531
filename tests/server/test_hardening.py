"""One request must never hurt another (issue 8), each case as the exact request against a real
`orcinus serve` process: the default model, with tight limits so that every bound is reachable.
"""
from __future__ import annotations

import json
import socket
import threading
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from orcinus.bench.server_process import ServerProcess
from orcinus.server.protocol import ChatCompletionChunk, CompletionChunk, ErrorResponse
from server_helpers import assert_openai_error, metric, start_server, stop_server, wait_until

MAX_WAITING = 4
MAX_N = 4
MAX_PROMPTS = 8
LIMIT_CONCURRENCY = 16
ARGS = ("--max-model-len", "2048", "--max-num-seqs", "2", "--max-waiting-requests", str(MAX_WAITING),
        "--max-n", str(MAX_N), "--max-prompts-per-request", str(MAX_PROMPTS),
        "--header-timeout", "2", "--body-timeout", "3", "--limit-concurrency", str(LIMIT_CONCURRENCY),
        "--served-model-name", "guarded")
COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def guarded(tmp_path_factory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("guarded") / "server.log"
    srv = start_server(log, *ARGS)
    yield srv
    assert stop_server(srv) == 0


@pytest.fixture(scope="module")
def http(guarded: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=guarded.base_url, timeout=120) as c:
        yield c


def _metrics(srv: ServerProcess) -> str:
    return httpx.get(srv.base_url + "/metrics", timeout=10).text


def _post_raw(http: httpx.Client, path: str, body: object) -> httpx.Response:
    # json.dumps writes a lone surrogate as the escape "\udc80", as a hostile client would send it.
    return http.post(path, content=json.dumps(body), headers={"content-type": "application/json"})


def _kv_all_free(srv: ServerProcess) -> bool:
    text = _metrics(srv)
    return metric(text, "orcinus:kv_cache_free_blocks") == metric(text, "orcinus:kv_cache_total_blocks") \
        and metric(text, "orcinus:num_requests_running") == 0


def _data_lines(resp: httpx.Response) -> list[str]:
    return [line for line in resp.iter_lines() if line.startswith("data: ")]


# ---------------------------------------------------------------------- 1, 7: parameters
def test_an_unrepresentable_top_k_fails_alone(http: httpx.Client, guarded: ServerProcess) -> None:
    """The issue's request beside a top_k: 5 neighbour in flight: 400 for it, the neighbour ends."""
    neighbour = {"prompt": "Once upon a time", "top_k": 5, "max_tokens": 24, "ignore_eos": True, "stream": True,
                 "seed": 7}
    with http.stream("POST", COMPLETIONS, json=neighbour) as stream:
        lines = stream.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))  # it is running
        for _ in range(3):  # three used to kill the engine for good
            resp = _post_raw(http, COMPLETIONS, {"prompt": "a", "top_k": 9223372036854775808})
            assert_openai_error(resp, 400, param="top_k")
        rest = [line for line in lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]"
    assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"
    assert http.get("/health").status_code == 200
    # A top_k beyond the vocabulary (but representable) cuts nothing: the same tokens as no top_k.
    body = {"prompt": "The sky is", "max_tokens": 6, "seed": 3, "ignore_eos": True}
    plain = http.post(COMPLETIONS, json=body).json()["choices"][0]["text"]
    wide = http.post(COMPLETIONS, json={**body, "top_k": 2**31 - 1})
    assert wide.status_code == 200 and wide.json()["choices"][0]["text"] == plain


@pytest.mark.parametrize("field, value", [("top_k", 2**31), ("seed", 2**63), ("seed", -(2**63) - 1),
                                          ("max_tokens", 2**31), ("min_tokens", 2**40),
                                          ("repetition_penalty", 1e-50), ("repetition_penalty", 0.001),
                                          ("n", MAX_N + 1)])
def test_out_of_range_numbers_are_refused(http: httpx.Client, field: str, value: object) -> None:
    assert_openai_error(_post_raw(http, COMPLETIONS, {"prompt": "a", "max_tokens": 1, field: value}), 400,
                        param=field)


def test_a_tiny_top_p_keeps_the_most_likely_token(http: httpx.Client) -> None:
    """top_p = 1e-50 is 0 in float32, which used to mask every token: it must mean 'only the
    most likely token', i.e. the greedy continuation, whatever the seed."""
    body = {"prompt": "The capital of France is", "max_tokens": 8, "ignore_eos": True}
    greedy = http.post(COMPLETIONS, json={**body, "temperature": 0}).json()["choices"][0]["text"]
    for seed in (1, 2):
        resp = http.post(COMPLETIONS, json={**body, "temperature": 1.0, "top_p": 1e-50, "seed": seed})
        assert resp.status_code == 200, resp.text
        assert resp.json()["choices"][0]["text"] == greedy


# ---------------------------------------------------------------------- 3: invalid text
SURROGATE = "\udc80x"


@pytest.mark.parametrize("path, body", [
    (CHAT, {"messages": [{"role": "user", "content": SURROGATE}]}),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": SURROGATE}]}]}),
    (CHAT, {"messages": [{"role": "user", "content": "hi", "name": SURROGATE}]}),
    (CHAT, {"messages": [{"role": "user", "content": "hi"}], "stop": SURROGATE}),
    (COMPLETIONS, {"prompt": SURROGATE}),
    (COMPLETIONS, {"prompt": ["fine", SURROGATE]}),
    (COMPLETIONS, {"prompt": "x", "stop": ["ok", SURROGATE]}),
    (COMPLETIONS, {"prompt": "x", "user": SURROGATE}),
    (COMPLETIONS, {"prompt": "x", "model": SURROGATE}),
])
def test_lone_surrogates_are_refused_everywhere(http: httpx.Client, path: str, body: dict) -> None:
    err = assert_openai_error(_post_raw(http, path, {**body, "max_tokens": 1}), 400)
    assert "surrogate" in err["message"]


# ---------------------------------------------------------------------- 10: clear messages
def test_clear_messages_for_bad_ids_and_long_stop_lists(http: httpx.Client) -> None:
    err = assert_openai_error(_post_raw(http, COMPLETIONS, {"prompt": [5, -1]}), 400, param="prompt")
    assert "-1" in err["message"] and "valid string" not in err["message"]
    err = assert_openai_error(_post_raw(http, COMPLETIONS, {"prompt": "x", "stop": ["s"] * 1000}), 400, param="stop")
    assert "1000" in err["message"] and "valid string" not in err["message"]


def test_iterations_are_bounded_by_default(guarded: ServerProcess) -> None:
    """Without --max-num-batched-tokens the server still bounds the tokens of one iteration, so
    that a burst of long prompts is spread over iterations instead of one that looks stalled."""
    startup = next(line for line in Path(guarded.log_path).read_text().splitlines() if "serving guarded" in line)
    import torch

    budget = 2048 if torch.cuda.is_available() else 512  # the engine's per-device default budget
    assert f"at most {budget} tokens per iteration" in startup and f"connection limit {LIMIT_CONCURRENCY}" in startup


def test_models_do_not_reveal_the_model_path(http: httpx.Client) -> None:
    for card in http.get("/v1/models").json()["data"] + [http.get("/v1/models/guarded").json()]:
        assert card["root"] and "/" not in card["root"] and "\\" not in card["root"]


# ---------------------------------------------------------------------- 4: the waiting bound
def test_the_waiting_bound_counts_sequences(http: httpx.Client, guarded: ServerProcess) -> None:
    # The request: 500 prompts x n=128 in 4 KB.
    err = assert_openai_error(_post_raw(http, COMPLETIONS, {"prompt": [[1000]] * 500, "n": 128, "max_tokens": 1}),
                              400)
    assert err["param"] in ("prompt", "n")
    assert_openai_error(_post_raw(http, COMPLETIONS, {"prompt": [[1000]] * (MAX_PROMPTS + 1), "max_tokens": 1}),
                        400, param="prompt")
    # Within the per-request caps but more sequences than may ever wait: the client must change it.
    err = assert_openai_error(_post_raw(http, COMPLETIONS, {"prompt": [[1000]] * 3, "n": 2, "max_tokens": 1}), 400)
    assert "sequences" in err["message"]
    long = {"prompt": "Count:", "max_tokens": 400, "ignore_eos": True, "stream": True, "n": 2}
    with http.stream("POST", COMPLETIONS, json=long) as running:  # both seats (max-num-seqs 2)
        # Keep the line iterator referenced: closing it (as a discarded generator is) closes the
        # response under httpx 0.29, and the server rightly aborts a request whose client hung up.
        lines = running.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        waiting: dict = {}

        def waiter() -> None:
            with httpx.Client(base_url=guarded.base_url, timeout=120) as c:
                waiting["resp"] = c.post(COMPLETIONS, json={"prompt": "hi", "max_tokens": 1, "n": 3})

        thread = threading.Thread(target=waiter)
        thread.start()
        assert wait_until(lambda: metric(_metrics(guarded), "orcinus:num_requests_waiting") == 3, 30)
        # 3 waiting + 2 would pass the bound of 4: 503 at once; 3 + 1 fits.
        resp = http.post(COMPLETIONS, json={"prompt": "hi", "max_tokens": 1, "n": 2}, timeout=10)
        assert_openai_error(resp, 503, code="queue_full")
        assert resp.headers["retry-after"]
    thread.join(60)
    assert waiting["resp"].status_code == 200
    assert wait_until(lambda: _kv_all_free(guarded), 30)


# ---------------------------------------------------------------------- 5: big prompts
def test_a_huge_prompt_is_refused_before_tokenising(http: httpx.Client, guarded: ServerProcess) -> None:
    """Refused from its length alone (the message counts characters, not tokens), on every path,
    while a tiny request sent after the huge ones completes."""
    huge = "word " * 1_500_000  # 7.5 MB, under the body limit
    results: list[httpx.Response] = []

    def send(path: str, body: dict) -> None:
        with httpx.Client(base_url=guarded.base_url, timeout=120) as c:
            results.append(c.post(path, json=body))

    threads = [threading.Thread(target=send, args=(COMPLETIONS, {"prompt": huge, "max_tokens": 1})),
               threading.Thread(target=send, args=(CHAT, {"messages": [{"role": "user", "content": huge}],
                                                         "max_tokens": 1}))]
    for t in threads:
        t.start()
    tiny = http.post(COMPLETIONS, json={"prompt": "hi", "max_tokens": 1})
    for t in threads:
        t.join(120)
    assert tiny.status_code == 200
    assert len(results) == 2
    for resp in results:
        err = assert_openai_error(resp, 400)
        assert "characters" in err["message"] and "2048 tokens" in err["message"]
    # Just under the character bound but over the context: tokenised, then refused by token count.
    max_len = http.get("/v1/models").json()["data"][0]["max_model_len"]
    err = assert_openai_error(http.post(COMPLETIONS, json={"prompt": "hello " * (max_len + 10), "max_tokens": 1}),
                              400, param="prompt")
    assert "tokens" in err["message"] and "characters" not in err["message"]


# ---------------------------------------------------------------------- 8: the log
def test_the_access_log_cannot_be_forged_and_hides_credentials(http: httpx.Client, guarded: ServerProcess) -> None:
    resp = http.get("/v1/models/x%0A2000-01-01 00:00:00 INFO FORGED LINE%1b[31m",
                    params={"api_key": "sekrit-1", "access_token": "sekrit-2", "page": "2", "bearer": "sekrit-3",
                            "pwd": "sekrit-4", "pass": "sekrit-5", "sig": "sekrit-6", "db_pass": "sekrit-7"})
    assert resp.status_code == 404
    # Issue 19: ";" separates parameters too; a secret behind one must not hide in the value before.
    assert http.get("/v1/models/y?page=3;token=sekrit-8;sig=sekrit-9").status_code == 404
    assert wait_until(lambda: "FORGED" in Path(guarded.log_path).read_text(), 10)
    log = Path(guarded.log_path).read_text()
    assert not any(line.startswith("2000-01-01") for line in log.splitlines())
    assert "\x1b" not in log
    line = next(line for line in log.splitlines() if "FORGED" in line)
    assert "x\\x0a2000-01-01" in line and "api_key=***" in line and "page=2" in line
    assert "sekrit" not in log
    assert wait_until(lambda: "/v1/models/y?page=3" in Path(guarded.log_path).read_text(), 10)
    assert "sekrit" not in Path(guarded.log_path).read_text()


# ---------------------------------------------------------------------- 9: connections
def _closed_by_server(sock: socket.socket, timeout_s: float) -> bool:
    sock.settimeout(timeout_s)
    try:
        while True:
            data = sock.recv(4096)
            if not data:
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False


def test_silent_and_slowloris_connections_are_closed(guarded: ServerProcess) -> None:
    quiet_before = Path(guarded.log_path).read_text().count("sent nothing within")
    silent = socket.create_connection(("127.0.0.1", guarded.port))
    slow = None
    try:
        assert _closed_by_server(silent, 30)
        # Issue 19: a connection that sent nothing (a load balancer's TCP check) is closed without a log line.
        assert Path(guarded.log_path).read_text().count("sent nothing within") == quiet_before
        # Opened only now: it starts sending at once, so its deadline is the one for slow headers.
        slow = socket.create_connection(("127.0.0.1", guarded.port))
        slow.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        closed = False
        for i in range(300):  # one header line at a time, never the blank line that ends them
            try:
                slow.sendall(f"X-Slow-{i}: a\r\n".encode())
            except OSError:
                closed = True
                break
            if _closed_by_server(slow, 0.1):
                closed = True
                break
        assert closed, "a connection trickling headers for 30 s stayed open"
        assert wait_until(lambda: "incomplete request headers" in Path(guarded.log_path).read_text(), 30)
    finally:
        silent.close()
        if slow is not None:
            slow.close()


def test_a_body_that_does_not_arrive_gets_408(guarded: ServerProcess) -> None:
    with socket.create_connection(("127.0.0.1", guarded.port)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"prompt\": ")
        sock.settimeout(60)
        reply = b""
        while b"\r\n\r\n" not in reply:
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]


def test_connections_beyond_the_limit_get_503(guarded: ServerProcess) -> None:
    idle = [socket.create_connection(("127.0.0.1", guarded.port)) for _ in range(LIMIT_CONCURRENCY)]
    try:
        with httpx.Client(base_url=guarded.base_url, timeout=10) as c:
            assert c.get("/health").status_code == 503
    finally:
        for s in idle:
            s.close()
    assert wait_until(lambda: httpx.get(guarded.base_url + "/health", timeout=10).status_code == 200, 30)


# ---------------------------------------------------------------------- soak
def test_soak_with_cancellations_leaks_no_blocks(guarded: ServerProcess) -> None:
    """100 requests, 4 at a time, every fifth abandoned mid-stream: all others complete, and
    afterwards every KV block is free and nothing is left buffered."""
    statuses: list[int] = []
    lock = threading.Lock()

    def worker(ids: range) -> None:
        with httpx.Client(base_url=guarded.base_url, timeout=120) as c:
            for i in ids:
                body = {"prompt": f"Request {i}:", "max_tokens": 3, "ignore_eos": True, "stream": i % 5 == 0}
                if i % 5 == 0:  # open a stream, read one event, hang up
                    with c.stream("POST", COMPLETIONS, json=body) as resp:
                        next(line for line in resp.iter_lines() if line.startswith("data: "))
                        status = -1
                else:
                    for _ in range(100):  # a hung-up stream the server has not noticed yet still counts
                        resp = c.post(COMPLETIONS, json=body)
                        if resp.status_code != 503:
                            break
                    status = resp.status_code
                with lock:
                    statuses.append(status)

    threads = [threading.Thread(target=worker, args=(range(k, 100, 4),)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(1500)  # a hang guard: on a busy machine 100 requests take many minutes
    assert len(statuses) == 100 and statuses.count(-1) == 20 and statuses.count(200) == 80
    assert wait_until(lambda: _kv_all_free(guarded), 30)
    assert metric(_metrics(guarded), "orcinus:stream_buffered_outputs") == 0
    assert httpx.get(guarded.base_url + "/health", timeout=10).status_code == 200


# ---------------------------------------------------------------------- the published schema
def _model_schema(model: type) -> dict:
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    schema.pop("$defs", None)
    return schema


def test_the_openapi_schema_says_what_the_server_accepts_and_streams(http: httpx.Client) -> None:
    doc = http.get("/openapi.json").json()
    schemas = doc["components"]["schemas"]
    assert "best_of" not in schemas["CompletionRequest"]["properties"]  # accepted only equal to n
    # exactly the response formats the server honours (structured outputs, issue 20)
    assert schemas["ResponseFormat"]["properties"]["type"].get("enum") == ["text", "json_object", "json_schema"]
    # Every event of a real stream is one of what the schema says a stream holds.
    for path, body, chunk in (
            (COMPLETIONS, {"prompt": "Hi", "max_tokens": 3, "logprobs": 2, "n": 2,
                           "stream_options": {"include_usage": True}}, "CompletionChunk"),
            (CHAT, {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "logprobs": True,
                    "top_logprobs": 2}, "ChatCompletionChunk")):
        stream_schema = doc["paths"][path]["post"]["responses"]["200"]["content"]["text/event-stream"]["schema"]
        refs = [alt.get("$ref", "") for alt in stream_schema["x-sse-data"]["oneOf"]]
        assert f"#/components/schemas/{chunk}" in refs
        with http.stream("POST", path, json={**body, "stream": True}) as resp:
            events = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        # The published component is the model the events are checked against (extra keys refused).
        model = {"CompletionChunk": CompletionChunk, "ChatCompletionChunk": ChatCompletionChunk}[chunk]
        assert schemas[chunk] == _model_schema(model)
        for event in events[:-1]:
            model.model_validate_json(event)
    ErrorResponse.model_validate_json(_post_raw(http, COMPLETIONS, {"prompt": "x", "top_k": -5}).text)


# ---------------------------------------------------------------------- issue 19, 1: one body freezes everyone
def test_a_huge_body_of_ids_is_refused_while_neighbours_flow(http: httpx.Client, guarded: ServerProcess) -> None:
    """The issue's body (the 8 MB limit filled with token ids) used to hold the event loop for
    seconds each: /health and every stream waited behind it. Measured by progress, not time:
    while six such bodies are refused one after another, /health answers many times per body and
    the neighbour's stream goes on to its end."""
    attack = json.dumps({"prompt": [1] * 3_900_000}, separators=(",", ":")).encode()  # just under the 8 MiB limit
    neighbour = {"prompt": "Once upon a time", "max_tokens": 48, "ignore_eos": True, "stream": True}
    refused: list[int] = []
    health_answers: list[int] = []
    attacks_done = threading.Event()

    def attacker() -> None:
        with httpx.Client(base_url=guarded.base_url, timeout=600) as c:
            for _ in range(6):
                resp = c.post(COMPLETIONS, content=attack, headers={"content-type": "application/json"})
                refused.append(resp.status_code)
                assert_openai_error(resp, 400, param="prompt")
        attacks_done.set()

    def prober() -> None:
        with httpx.Client(base_url=guarded.base_url, timeout=600) as c:
            while not attacks_done.is_set():
                health_answers.append(c.get("/health").status_code)

    with http.stream("POST", COMPLETIONS, json=neighbour) as stream:
        lines = stream.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))  # it is running
        threads = [threading.Thread(target=attacker), threading.Thread(target=prober)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        rest = [line for line in lines if line.startswith("data: ")]
    assert refused == [400] * 6
    # Each refusal costs the loop a few passes over the bytes: /health got through many times per
    # body (a loop held for seconds per body answers about once per body).
    assert len(health_answers) >= 3 * len(refused) and set(health_answers) == {200}
    assert rest[-1] == "data: [DONE]"
    assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"


def test_many_long_prompts_are_refused_without_tokenising_them_whole(http: httpx.Client) -> None:
    """Scaled down from the issue's 12 x 650k characters: prompts under the character bound but
    far over the context are refused after their heads, and a tiny request is served after."""
    text = "The quick brown fox jumps over the lazy dog. " * 2000  # 90k characters, ~20k tokens
    err = assert_openai_error(http.post(COMPLETIONS, json={"prompt": [text] * MAX_WAITING, "max_tokens": 1}), 400,
                              param="prompt")
    assert "context length is 2048" in err["message"]
    assert http.post(COMPLETIONS, json={"prompt": "hi", "max_tokens": 1}).status_code == 200


def test_echo_times_n_is_bounded(http: httpx.Client) -> None:
    """echo repeats the prompt in front of every sample: 0.5 MB x n=64 made a 32 MB response."""
    prompt = "ab " * 20
    ok = http.post(COMPLETIONS, json={"prompt": prompt, "echo": True, "n": 2, "max_tokens": 1})
    assert ok.status_code == 200 and all(c["text"].startswith(prompt) for c in ok.json()["choices"])
    big = "x" * 40_000  # within the character bound; 8 prompts x 4 samples would echo 1.28 MB
    err = assert_openai_error(http.post(COMPLETIONS, json={"prompt": [big] * MAX_PROMPTS, "echo": True, "n": MAX_N,
                                                           "max_tokens": 1}), 400, param="echo")
    assert "n=4" in err["message"]
