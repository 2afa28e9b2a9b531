"""Structured outputs, tools, logit_bias and /tokenize through the real server and the official
`openai` client: outputs validate against their constraint under random sampling, streamed
equals whole, bad input is a 400 naming the field and leaves the server serving."""
from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pytest

from server_helpers import TIME, WEATHER

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
          "required": ["name", "age", "tags"], "additionalProperties": False}
ASK = [{"role": "user", "content": "Describe a person as JSON."}]


@pytest.mark.parametrize("seed", [1, 2])
def test_json_schema_under_random_sampling_n3(client: openai.OpenAI, model_name: str, seed: int) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    resp = client.chat.completions.create(model=model_name, messages=ASK, response_format=fmt, n=3, temperature=1.0,
                                          seed=seed, max_tokens=120)
    for choice in resp.choices:
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content), PERSON)
        assert choice.message.refusal is None and choice.message.tool_calls is None
    # streamed equals whole, sample by sample
    chunks = client.chat.completions.create(model=model_name, messages=ASK, response_format=fmt, n=3,
                                            temperature=1.0, seed=seed, max_tokens=120, stream=True)
    texts = [""] * 3
    for chunk in chunks:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
    assert texts == [c.message.content for c in resp.choices]


def test_json_object_and_raw_body_shape(http: httpx.Client, model_name: str) -> None:
    body = {"model": model_name, "messages": ASK, "response_format": {"type": "json_object"}, "temperature": 1.0,
            "seed": 3, "max_tokens": 40}
    data = http.post("/v1/chat/completions", json=body).json()
    msg = data["choices"][0]["message"]
    assert "refusal" in msg and msg["refusal"] is None and "tool_calls" not in msg
    if data["choices"][0]["finish_reason"] == "stop":
        assert isinstance(json.loads(msg["content"]), dict)


@pytest.mark.parametrize("field, value, check", [
    ("structured_outputs", {"regex": r"\d{3}-[a-z]{2,4}"}, lambda t: re.fullmatch(r"\d{3}-[a-z]{2,4}", t)),
    ("guided_regex", r"(yes|no), because [a-z ]{1,20}\.", lambda t: re.fullmatch(r"(yes|no), because [a-z ]{1,20}\.", t)),
    ("structured_outputs", {"choice": ["Paris", "London", "Rome"]}, lambda t: t in ("Paris", "London", "Rome")),
    ("guided_choice", ["red", "green"], lambda t: t in ("red", "green")),
    ("structured_outputs", {"grammar": 'start: "x" ("y" | "z") ("y" | "z")? "!"'}, lambda t: re.fullmatch(r"x[yz]{1,2}!", t)),
    ("guided_json", PERSON, lambda t: jsonschema.validate(json.loads(t), PERSON) is None),
])
def test_completions_constraints(http: httpx.Client, model_name: str, field: str, value, check) -> None:
    body = {"model": model_name, "prompt": "Answer:", "max_tokens": 100, "temperature": 1.0, "n": 2, "seed": 7,
            field: value}
    resp = http.post("/v1/completions", json=body)
    assert resp.status_code == 200, resp.text
    for choice in resp.json()["choices"]:
        assert choice["finish_reason"] == "stop", choice
        assert check(choice["text"]), choice["text"]


def test_named_tool_choice(client: openai.OpenAI, model_name: str) -> None:
    resp = client.chat.completions.create(
        model=model_name, messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, temperature=1.0, seed=5, max_tokens=80)
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])


def test_required_tool_choice_streamed_equals_whole(client: openai.OpenAI, model_name: str) -> None:
    kwargs = dict(model=model_name, messages=[{"role": "user", "content": "What time is it in Tokyo?"}],
                  tools=[WEATHER, TIME], tool_choice="required", temperature=1.0, seed=11, max_tokens=120)
    whole = client.chat.completions.create(**kwargs).choices[0]
    assert whole.finish_reason == "tool_calls" and whole.message.tool_calls
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    for call in whole.message.tool_calls:
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
    assembled: dict[int, dict] = {}
    reason = None
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        for c in chunk.choices:
            for d in c.delta.tool_calls or []:
                entry = assembled.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
                entry["id"] = d.id or entry["id"]
                entry["name"] += (d.function.name or "") if d.function else ""
                entry["arguments"] += (d.function.arguments or "") if d.function else ""
            reason = c.finish_reason or reason
    assert reason == "tool_calls"
    assert [(e["name"], e["arguments"]) for _, e in sorted(assembled.items())] == \
        [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    assert all(e["id"] for e in assembled.values())


def test_parallel_tool_calls_false_gives_one_call(client: openai.OpenAI, model_name: str) -> None:
    for seed in (1, 2, 3):
        resp = client.chat.completions.create(
            model=model_name, messages=[{"role": "user", "content": "Weather and time in Oslo?"}], tools=[WEATHER, TIME],
            tool_choice="required", parallel_tool_calls=False, temperature=1.0, seed=seed, max_tokens=120)
        assert len(resp.choices[0].message.tool_calls) == 1


def test_auto_tool_choice_and_round_trip(client: openai.OpenAI, model_name: str) -> None:
    messages = [{"role": "user", "content": "What is the weather in Paris? Use the tool."}]
    resp = client.chat.completions.create(model=model_name, messages=messages, tools=[WEATHER], temperature=0,
                                          max_tokens=80)
    choice = resp.choices[0]
    # auto: either a call the parser recognised, or plain content; never both missing
    assert choice.message.tool_calls or choice.message.content is not None
    if choice.message.tool_calls:
        assert choice.finish_reason == "tool_calls"
    # the round trip: the assistant's call and the tool's result in the history
    history = messages + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
    ]
    final = client.chat.completions.create(model=model_name, messages=history, tools=[WEATHER], tool_choice="none",
                                           temperature=0, max_tokens=30)
    assert final.choices[0].message.content and final.choices[0].message.tool_calls is None


def test_logit_bias_forces_a_token(http: httpx.Client, model_name: str) -> None:
    ids = http.post("/tokenize", json={"prompt": " banana", "add_special_tokens": False}).json()["tokens"]
    body = {"model": model_name, "prompt": "Hello", "max_tokens": 3, "temperature": 0,
            "logit_bias": {str(ids[0]): 100}}
    data = http.post("/v1/completions", json=body).json()
    toks = http.post("/tokenize", json={"prompt": data["choices"][0]["text"], "add_special_tokens": False}).json()
    assert toks["tokens"][0] == ids[0]


def test_tokenize_detokenize(http: httpx.Client, model_name: str) -> None:
    tok = http.post("/tokenize", json={"model": model_name, "prompt": "Hello world", "return_token_strs": True}).json()
    assert tok["count"] == len(tok["tokens"]) > 0 and tok["max_model_len"] > 0 and len(tok["token_strs"]) == tok["count"]
    assert http.post("/detokenize", json={"tokens": tok["tokens"]}).json()["prompt"].endswith("Hello world")
    chat = http.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["count"] > 3
    assert http.post("/tokenize", json={"prompt": "x", "messages": []}).status_code == 400
    assert http.post("/detokenize", json={"tokens": [10**9]}).status_code == 400


BAD = [
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}}, "response_format"),
    ("/v1/chat/completions", {"response_format": {"type": "yaml"}}, "response_format"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema"}}, "response_format"),
    ("/v1/completions", {"structured_outputs": {"regex": "(abc"}}, "structured_outputs"),
    ("/v1/completions", {"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
    ("/v1/completions", {"structured_outputs": {"regex": "a", "disable_fallback": True}}, "structured_outputs"),
    ("/v1/completions", {"structured_outputs": {"structural_tag": "{}"}}, "structured_outputs"),
    ("/v1/completions", {"guided_regex": "a", "guided_choice": ["b"]}, "guided_json"),
    ("/v1/completions", {"guided_regex": "a", "response_format": {"type": "json_object"}}, "guided_regex"),
    ("/v1/completions", {"guided_decoding_backend": "xgrammar", "guided_regex": "a"}, "guided_decoding_backend"),
    ("/v1/completions", {"guided_json": "{not json"}, "guided_json"),
    ("/v1/completions", {"structured_outputs": {"grammar": "start: ( "}}, "structured_outputs"),
    ("/v1/chat/completions", {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ("/v1/chat/completions", {"tool_choice": "required"}, "tool_choice"),
    ("/v1/chat/completions", {"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ("/v1/completions", {"logit_bias": {"99999999": 1}}, "logit_bias"),
    ("/v1/completions", {"logit_bias": {"5": 101}}, "logit_bias"),
    ("/v1/completions", {"logit_bias": {"abc": 1}}, "logit_bias"),
    ("/v1/completions", {"prompt_logprobs": 21}, "prompt_logprobs"),
]


@pytest.mark.parametrize("path, extra, param", BAD)
def test_bad_input_is_400_naming_the_field(http: httpx.Client, model_name: str, path: str, extra: dict,
                                           param: str) -> None:
    body = {"model": model_name, "max_tokens": 4, **extra}
    body.update({"messages": ASK} if "chat" in path else {"prompt": "hi"})
    resp = http.post(path, json=body)
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"]
    assert param in (err.get("param") or "") or param in err["message"], err
    # neighbours unaffected: the server still answers
    ok = http.post("/v1/completions", json={"model": model_name, "prompt": "hi", "max_tokens": 2})
    assert ok.status_code == 200
