"""Bad input over raw HTTP: always a 4xx with OpenAI's error body, never a 500, never harm to others."""
from __future__ import annotations

import json

import httpx
import pytest

from server_helpers import assert_openai_error

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
MSG = [{"role": "user", "content": "hi"}]


def _post(http: httpx.Client, path: str, body: object) -> httpx.Response:
    return http.post(path, content=json.dumps(body), headers={"content-type": "application/json"})


@pytest.mark.parametrize("raw", [b"{", b'{"prompt": "x",}', b"not json at all", b'{"prompt": "x", "max_tokens": NaN}',
                                 b"", b"[1, 2]", b'"a string"', b"\xff\xfe"])
def test_malformed_bodies(http: httpx.Client, raw: bytes) -> None:
    resp = http.post(COMPLETIONS, content=raw, headers={"content-type": "application/json"})
    assert_openai_error(resp, 400)


@pytest.mark.parametrize("path, body, param", [
    # wrong types
    (COMPLETIONS, {"prompt": 5}, "prompt"),
    (COMPLETIONS, {"prompt": "x", "max_tokens": "5"}, "max_tokens"),
    (COMPLETIONS, {"prompt": "x", "max_tokens": 5.5}, "max_tokens"),
    (COMPLETIONS, {"prompt": "x", "temperature": "hot"}, "temperature"),
    (COMPLETIONS, {"prompt": "x", "stream": "yes"}, "stream"),
    (COMPLETIONS, {"prompt": ["x", 1]}, "prompt"),
    (COMPLETIONS, {"prompt": "x", "stop": 3}, "stop"),
    (CHAT, {"messages": "hi"}, "messages"),
    (CHAT, {"messages": [{"role": "user"}], "max_tokens": 2, "n": "2"}, "n"),
    (CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
    (CHAT, {"messages": [{"content": "hi"}]}, "messages"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages"),
    # missing or empty
    (COMPLETIONS, {}, "prompt"),
    (COMPLETIONS, {"prompt": []}, "prompt"),
    (COMPLETIONS, {"prompt": ""}, "prompt"),
    (CHAT, {"messages": []}, "messages"),
    (CHAT, {"model": "x"}, "messages"),
    # out of range
    (COMPLETIONS, {"prompt": "x", "temperature": -0.5}, "temperature"),
    (COMPLETIONS, {"prompt": "x", "top_p": 0}, "top_p"),
    (COMPLETIONS, {"prompt": "x", "top_p": 1.5}, "top_p"),
    (COMPLETIONS, {"prompt": "x", "n": 0}, "n"),
    (COMPLETIONS, {"prompt": "x", "n": 100000}, "n"),
    (COMPLETIONS, {"prompt": "x", "max_tokens": 0}, "max_tokens"),
    (COMPLETIONS, {"prompt": "x", "max_tokens": -3}, "max_tokens"),
    (COMPLETIONS, {"prompt": "x", "logprobs": 21}, "logprobs"),
    (COMPLETIONS, {"prompt": "x", "presence_penalty": 2.5}, "presence_penalty"),
    (COMPLETIONS, {"prompt": "x", "frequency_penalty": -9}, "frequency_penalty"),
    (COMPLETIONS, {"prompt": "x", "seed": 2**70}, "seed"),
    (COMPLETIONS, {"prompt": "x", "top_k": -2}, "top_k"),
    (COMPLETIONS, {"prompt": "x", "min_p": 1.5}, "min_p"),
    (COMPLETIONS, {"prompt": "x", "repetition_penalty": 0}, "repetition_penalty"),
    (COMPLETIONS, {"prompt": "x", "stop_token_ids": [-1]}, "stop_token_ids"),
    (COMPLETIONS, {"prompt": [-5, 3]}, "prompt"),
    (COMPLETIONS, {"prompt": [10**12]}, "prompt"),
    (COMPLETIONS, {"prompt": "x", "max_tokens": 4, "min_tokens": 9}, "min_tokens"),
    (CHAT, {"messages": MSG, "top_logprobs": 3}, None),
    (CHAT, {"messages": MSG, "logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    (CHAT, {"messages": MSG, "max_completion_tokens": 0}, "max_completion_tokens"),
    # what this server does not implement is refused, not ignored (more in test_structured_server.py)
    (CHAT, {"messages": MSG, "tools": [{"type": "function", "function": {"name": "f g"}}]}, "tools"),
    (CHAT, {"messages": MSG, "response_format": {"type": "yaml"}}, "response_format"),
    (CHAT, {"messages": MSG, "logit_bias": {"5": 500}}, "logit_bias"),
    (COMPLETIONS, {"prompt": "x", "prompt_logprobs": 21}, "prompt_logprobs"),
    (COMPLETIONS, {"prompt": "x", "prompt_logprobs": -1}, "prompt_logprobs"),
    (CHAT, {"messages": MSG, "prompt_logprobs": 50}, "prompt_logprobs"),
    (COMPLETIONS, {"prompt": "x", "prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
    (COMPLETIONS, {"prompt": "x", "max_tokens": 0}, "max_tokens"),  # 0 only with echo
    (COMPLETIONS, {"prompt": "x", "suffix": "y"}, "suffix"),
])
def test_invalid_requests(http: httpx.Client, path: str, body: dict, param: str | None) -> None:
    assert_openai_error(_post(http, path, body), 400, param=param)


def test_unknown_model(http: httpx.Client) -> None:
    assert_openai_error(_post(http, COMPLETIONS, {"model": "gpt-9", "prompt": "x"}), 404, "model", "model_not_found")
    assert_openai_error(_post(http, CHAT, {"model": "gpt-9", "messages": MSG}), 404, "model", "model_not_found")
    assert_openai_error(http.get("/v1/models/gpt-9"), 404, code="model_not_found")


def test_prompt_longer_than_context(http: httpx.Client) -> None:
    max_len = http.get("/v1/models").json()["data"][0]["max_model_len"]
    too_long = [1] * (max_len + 1)
    err = assert_openai_error(_post(http, COMPLETIONS, {"prompt": too_long, "max_tokens": 1}), 400, "prompt")
    assert str(max_len) in err["message"]
    words = "hello " * (max_len + 10)
    assert_openai_error(_post(http, CHAT, {"messages": [{"role": "user", "content": words}]}), 400)


def test_max_tokens_that_cannot_fit(http: httpx.Client) -> None:
    max_len = http.get("/v1/models").json()["data"][0]["max_model_len"]
    err = assert_openai_error(_post(http, COMPLETIONS, {"prompt": "x", "max_tokens": max_len}), 400, "max_tokens")
    assert "max_tokens" in err["message"]
    assert_openai_error(_post(http, CHAT, {"messages": MSG, "max_tokens": 10**9}), 400, "max_tokens")


def test_unknown_routes_and_methods(http: httpx.Client) -> None:
    assert_openai_error(http.get("/v1/nothing-here"), 404)
    assert_openai_error(http.get(COMPLETIONS), 405)


def test_unknown_fields_are_tolerated(http: httpx.Client) -> None:
    resp = _post(http, COMPLETIONS, {"prompt": "x", "max_tokens": 1, "some_future_field": {"a": 1}})
    assert resp.status_code == 200, resp.text


def test_bad_requests_leave_the_server_healthy(http: httpx.Client) -> None:
    """After everything above, a request in flight while bad ones arrive is unharmed."""
    with http.stream("POST", COMPLETIONS, json={"prompt": "Count: one, two,", "max_tokens": 12, "temperature": 0,
                                                "stream": True, "ignore_eos": True}) as stream:
        for bad in ({"prompt": [10**12]}, {"prompt": "x", "max_tokens": 10**9}, {"messages": []}):
            assert _post(http, CHAT if "messages" in bad else COMPLETIONS, bad).status_code == 400
        events = [line for line in stream.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    finals = [json.loads(e[6:]) for e in events[:-1]]
    assert finals[-1]["choices"][0]["finish_reason"] == "length"
    assert http.get("/health").status_code == 200
