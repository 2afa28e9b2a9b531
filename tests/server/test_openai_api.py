"""The server driven by the official `openai` client: what a user's code sees."""
from __future__ import annotations

import time

import httpx
import openai
import pytest

from server_helpers import metric

PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "Name three colours."}]


def _stream_text(chunks, n: int = 1) -> tuple[list[str], list[str | None], object]:
    texts, reasons, usage = [""] * n, [None] * n, None
    for chunk in chunks:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            piece = choice.text if hasattr(choice, "text") else (choice.delta.content or "")
            texts[choice.index] += piece
            if choice.finish_reason is not None:
                assert reasons[choice.index] is None, "a choice finished twice"
                reasons[choice.index] = choice.finish_reason
    return texts, reasons, usage


def test_models_version_health(http: httpx.Client, model_name: str) -> None:
    models = http.get("/v1/models").json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == [model_name]
    assert models["data"][0]["object"] == "model" and models["data"][0]["max_model_len"] > 0
    assert http.get(f"/v1/models/{model_name}").json()["id"] == model_name
    assert http.get("/version").json()["version"]
    health = http.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_completion(client: openai.OpenAI, model_name: str) -> None:
    before = time.time()
    resp = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=8, temperature=0)
    assert resp.id.startswith("cmpl-") and resp.object == "text_completion" and resp.model == model_name
    assert before - 2 <= resp.created <= time.time() + 2
    (choice,) = resp.choices
    assert choice.index == 0 and choice.text and choice.finish_reason in ("stop", "length")
    u = resp.usage
    assert u.prompt_tokens > 0 and 0 < u.completion_tokens <= 8
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert (choice.finish_reason == "length") == (u.completion_tokens == 8)
    # Without `model`, the served model is used.
    assert httpx.post(str(client.base_url).rstrip("/") + "/completions",
                      json={"prompt": PROMPT, "max_tokens": 2}, timeout=60).status_code == 200


def test_completion_streaming_equals_whole(client: openai.OpenAI, model_name: str) -> None:
    kw = dict(model=model_name, prompt=PROMPT, max_tokens=12, temperature=0)
    whole = client.completions.create(**kw)
    texts, reasons, usage = _stream_text(client.completions.create(**kw, stream=True,
                                                                    stream_options={"include_usage": True}))
    assert texts == [whole.choices[0].text]
    assert reasons == [whole.choices[0].finish_reason]
    assert usage.model_dump() == whole.usage.model_dump()


def test_chat(client: openai.OpenAI, model_name: str) -> None:
    resp = client.chat.completions.create(model=model_name, messages=CHAT, max_completion_tokens=10, temperature=0)
    assert resp.id.startswith("chatcmpl-") and resp.object == "chat.completion"
    (choice,) = resp.choices
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    assert resp.usage.completion_tokens <= 10


def test_chat_streaming_equals_whole(client: openai.OpenAI, model_name: str) -> None:
    kw = dict(model=model_name, messages=[{"role": "system", "content": "Be brief."}, *CHAT], max_tokens=12,
              temperature=0)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[-1].choices == [] and chunks[-1].usage is not None  # the usage chunk comes last
    texts, reasons, usage = _stream_text(chunks)
    assert texts == [whole.choices[0].message.content]
    assert reasons == [whole.choices[0].finish_reason]
    assert usage.model_dump() == whole.usage.model_dump()


def test_n_samples(client: openai.OpenAI, model_name: str) -> None:
    kw = dict(model=model_name, prompt=PROMPT, max_tokens=5, temperature=1.0, seed=7, n=3,
              extra_body={"ignore_eos": True})
    resp = client.completions.create(**kw)
    assert sorted(c.index for c in resp.choices) == [0, 1, 2]
    assert all(c.finish_reason == "length" for c in resp.choices)
    assert resp.usage.completion_tokens == 15
    texts, reasons, _ = _stream_text(client.completions.create(**kw, stream=True), n=3)
    assert texts == [c.text for c in sorted(resp.choices, key=lambda c: c.index)]  # seeded: reproducible
    assert reasons == ["length"] * 3
    # Batched prompts: choice index = prompt index * n + sample index.
    batch = client.completions.create(model=model_name, prompt=[PROMPT, "One, two,"], max_tokens=3, n=2,
                                      temperature=0)
    assert sorted(c.index for c in batch.choices) == [0, 1, 2, 3]
    by_index = {c.index: c.text for c in batch.choices}
    assert by_index[0] == by_index[1] and by_index[2] == by_index[3]  # greedy samples agree


def test_chat_n_samples_streaming(client: openai.OpenAI, model_name: str) -> None:
    kw = dict(model=model_name, messages=CHAT, max_tokens=6, temperature=0.8, seed=3, n=2)
    whole = client.chat.completions.create(**kw)
    texts, reasons, _ = _stream_text(client.chat.completions.create(**kw, stream=True), n=2)
    assert texts == [c.message.content for c in sorted(whole.choices, key=lambda c: c.index)]
    assert reasons == [c.finish_reason for c in sorted(whole.choices, key=lambda c: c.index)]


def test_stop_strings(client: openai.OpenAI, model_name: str) -> None:
    free = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text
    words = free.split()
    assert len(words) >= 3, free
    stop = words[1]
    expected = free[:free.index(stop)]
    assert expected
    for stream in (False, True):
        kw = dict(model=model_name, prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop, "\u2603never"])
        if stream:
            texts, reasons, _ = _stream_text(client.completions.create(**kw, stream=True))
            text, reason, stop_reason = texts[0], reasons[0], None
        else:
            choice = client.completions.create(**kw).choices[0]
            text, reason, stop_reason = choice.text, choice.finish_reason, choice.model_extra.get("stop_reason")
            assert stop_reason == stop
        assert (text, reason) == (expected, "stop")
    kept = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=12, temperature=0, stop=stop,
                                     extra_body={"include_stop_str_in_output": True}).choices[0].text
    assert kept == expected + stop


def test_completion_logprobs(client: openai.OpenAI, model_name: str) -> None:
    resp = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3)
    choice = resp.choices[0]
    lp = choice.logprobs
    n = resp.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    assert "".join(lp.tokens).startswith(choice.text)
    for tok, chosen, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert chosen <= 0 and 3 <= len(top) <= 4
        assert top[tok] == chosen == max(top.values())  # greedy picks the most likely token
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    # Streamed log-probs add up to the same lists.
    streamed = []
    for chunk in client.completions.create(model=model_name, prompt=PROMPT, max_tokens=6, temperature=0,
                                           logprobs=3, stream=True):
        if chunk.choices and chunk.choices[0].logprobs:
            streamed += chunk.choices[0].logprobs.token_logprobs
    assert streamed == pytest.approx(lp.token_logprobs)


def test_chat_logprobs(client: openai.OpenAI, model_name: str) -> None:
    resp = client.chat.completions.create(model=model_name, messages=CHAT, max_tokens=5, temperature=0, logprobs=True,
                                          top_logprobs=2)
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 2
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
        assert entry.top_logprobs[0].token == entry.token  # greedy
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token
    plain = client.chat.completions.create(model=model_name, messages=CHAT, max_tokens=5, temperature=0)
    assert plain.choices[0].logprobs is None


def test_seeds_reproduce(client: openai.OpenAI, model_name: str) -> None:
    def sample(seed: int) -> str:
        return client.completions.create(model=model_name, prompt="Once upon a time", max_tokens=8, temperature=1.0,
                                         seed=seed).choices[0].text

    first = sample(1234)
    assert sample(1234) == first
    assert any(sample(s) != first for s in (1, 2, 3))


def test_vllm_extras(client: openai.OpenAI, model_name: str) -> None:
    resp = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=7, temperature=0.7, seed=1,
                                     presence_penalty=0.5, frequency_penalty=0.5, user="someone",
                                     extra_body={"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.2,
                                                 "min_tokens": 7, "ignore_eos": True, "stop_token_ids": [2]})
    assert resp.usage.completion_tokens == 7 and resp.choices[0].finish_reason == "length"


def test_echo(client: openai.OpenAI, model_name: str) -> None:
    plain = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=4, temperature=0).choices[0].text
    echoed = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=4, temperature=0, echo=True)
    assert echoed.choices[0].text == PROMPT + plain


def test_metrics_names(http: httpx.Client) -> None:
    text = http.get("/metrics").text
    for name in ("orcinus:num_requests_running", "orcinus:num_requests_waiting", "orcinus:kv_cache_usage_perc",
                 "orcinus:prompt_tokens_total", "orcinus:generation_tokens_total",
                 "orcinus:time_to_first_token_seconds_count", "orcinus:time_per_output_token_seconds_count",
                 "orcinus:e2e_request_latency_seconds_count"):
        assert f"\n{name}" in text, name
    assert metric(text, "orcinus:generation_tokens_total") > 0
    assert metric(text, "orcinus:e2e_request_latency_seconds_count") > 0
