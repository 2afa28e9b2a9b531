"""Prompt log-probs through real `orcinus serve` processes, against transformers with the same
weights: legacy completions' `echo` with `logprobs` through the official `openai` client (whole,
streamed, and `max_tokens: 0` scoring as lm-eval-harness does), vLLM's `prompt_logprobs` extra on
completions and chat, and the bound on the response's size."""
from __future__ import annotations

import json

import httpx
import openai
import pytest
import torch

from references import hf_generate_greedy, reference_logprobs

PROMPT = "The capital of France is Paris, and the capital of Italy is"
TOL = 1e-4


@pytest.fixture(scope="module")
def f32(float32_cpu_server) -> tuple[openai.OpenAI, str]:
    base = float32_cpu_server.base_url
    name = httpx.get(base + "/v1/models", timeout=10).json()["data"][0]["id"]
    return openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120), name


@pytest.fixture(scope="module")
def prompt_ids(default_llm) -> list[int]:
    return default_llm.engine.tokenizer.encode(PROMPT)  # as the server tokenises a text prompt


@torch.no_grad()
def _hf_prompt(hf_model, ids: list[int]) -> torch.Tensor:
    return torch.log_softmax(hf_model(torch.tensor([ids])).logits[0, :-1].float(), dim=-1)


def _check_echoed_prompt(lp, ids: list[int], tokenizer, hf_model, k: int) -> None:
    """The legacy logprobs' first len(ids) positions: the prompt's tokens, null first."""
    ref = _hf_prompt(hf_model, ids)
    pieces = tokenizer.token_pieces(ids)
    assert lp.tokens[:len(ids)] == pieces
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    offsets, at = [], 0
    for piece in pieces:
        offsets.append(at)
        at += len(piece)
    assert lp.text_offset[:len(ids)] == offsets
    for i in range(1, len(ids)):
        assert lp.token_logprobs[i] == pytest.approx(float(ref[i - 1, ids[i]]), abs=TOL), i
        best = torch.topk(ref[i - 1], k)
        top = lp.top_logprobs[i]
        # the top k plus the prompt's own token when it is not among them
        assert set(top) == set(tokenizer.token_pieces(best.indices.tolist() + [ids[i]])), i
        for t, v in zip(best.indices.tolist(), best.values.tolist()):
            assert top[tokenizer.token_pieces([t])[0]] == pytest.approx(v, abs=TOL), (i, t)


def test_echo_with_logprobs_covers_prompt_then_completion(f32, prompt_ids, default_llm, smollm2_transformers):
    client, name = f32
    tokenizer = default_llm.engine.tokenizer
    resp = client.completions.create(model=name, prompt=PROMPT, max_tokens=4, temperature=0, echo=True, logprobs=3,
                                     extra_body={"ignore_eos": True})
    choice = resp.choices[0]
    assert choice.text.startswith(PROMPT)
    lp = choice.logprobs
    n = len(prompt_ids)
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n + 4
    _check_echoed_prompt(lp, prompt_ids, tokenizer, smollm2_transformers, 3)
    # the completion continues the same lists, its offsets in the echoed text
    generated = hf_generate_greedy(smollm2_transformers, prompt_ids, 4)
    ref = reference_logprobs(smollm2_transformers, prompt_ids, generated)
    assert lp.tokens[n:] == tokenizer.token_pieces(generated)
    assert lp.text_offset[n] == len(PROMPT)
    for j, tok in enumerate(generated):
        assert lp.token_logprobs[n + j] == pytest.approx(float(ref[j, tok]), abs=TOL), j
    assert resp.usage.prompt_tokens == n and resp.usage.completion_tokens == 4


def test_max_tokens_zero_with_echo_scores_the_text(f32, prompt_ids, default_llm, smollm2_transformers):
    """lm-eval-harness's loglikelihood request: the prompt back with its log-probs, nothing more."""
    client, name = f32
    ref = _hf_prompt(smollm2_transformers, prompt_ids)
    expected = sum(float(ref[i - 1, prompt_ids[i]]) for i in range(1, len(prompt_ids)))
    for prompt in ([PROMPT, PROMPT], prompt_ids):  # text prompts, and the same as token ids: the same answer
        resp = client.completions.create(model=name, prompt=prompt, max_tokens=0, echo=True, logprobs=1,
                                         temperature=0)
        assert len(resp.choices) == (2 if isinstance(prompt[0], str) else 1)
        for choice in resp.choices:
            assert choice.text == PROMPT and choice.finish_reason == "length"
            assert len(choice.logprobs.tokens) == len(prompt_ids)
            _check_echoed_prompt(choice.logprobs, prompt_ids, default_llm.engine.tokenizer, smollm2_transformers, 1)
            assert sum(choice.logprobs.token_logprobs[1:]) == pytest.approx(expected, abs=1e-3)
        assert resp.usage.completion_tokens == 0


def test_streamed_echo_sends_the_prompt_and_its_logprobs_first(f32, prompt_ids, default_llm,
                                                                smollm2_transformers):
    client, name = f32
    kwargs = dict(model=name, prompt=PROMPT, max_tokens=5, temperature=0, echo=True, logprobs=2,
                  extra_body={"ignore_eos": True})
    whole = client.completions.create(**kwargs).choices[0]
    chunks = [c for c in client.completions.create(stream=True, **kwargs) if c.choices]
    first = chunks[0].choices[0]
    assert first.text.startswith(PROMPT)
    assert len(first.logprobs.tokens) >= len(prompt_ids)
    _check_echoed_prompt(first.logprobs, prompt_ids, default_llm.engine.tokenizer, smollm2_transformers, 2)
    assert "".join(c.choices[0].text for c in chunks) == whole.text
    streamed = [lp for c in chunks if c.choices[0].logprobs for lp in c.choices[0].logprobs.token_logprobs]
    assert streamed[0] is None and whole.logprobs.token_logprobs[0] is None
    assert streamed[1:] == pytest.approx(whole.logprobs.token_logprobs[1:], abs=TOL)
    offsets = [o for c in chunks if c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
    assert offsets == whole.logprobs.text_offset


def _check_vllm_list(entries: list, ids: list[int], hf_model, k: int) -> None:
    ref = _hf_prompt(hf_model, ids)
    assert len(entries) == len(ids) and entries[0] is None
    for i in range(1, len(ids)):
        row, entry = ref[i - 1], entries[i]
        own = entry[str(ids[i])]
        assert own["logprob"] == pytest.approx(float(row[ids[i]]), abs=TOL), i
        assert own["rank"] == int((row > row[ids[i]]).sum()) + 1, i
        best = torch.topk(row, k)
        assert {int(t) for t in entry} == set(best.indices.tolist()) | {ids[i]}, i
        for rank, (t, v) in enumerate(zip(best.indices.tolist(), best.values.tolist()), 1):
            assert entry[str(t)]["logprob"] == pytest.approx(v, abs=TOL) and entry[str(t)]["rank"] == rank


def test_vllm_prompt_logprobs_on_completions(tiny_server, checkpoint_factory):
    """Token-id prompts without a tokenizer; every choice of n carries the list."""
    _, hf_model = checkpoint_factory("llama")
    ids = [5, 9, 11, 40, 7, 100, 3, 250, 17]
    body = {"prompt": ids, "max_tokens": 2, "n": 2, "prompt_logprobs": 3, "temperature": 1.0, "seed": 3}
    resp = httpx.post(tiny_server.base_url + "/v1/completions", json=body, timeout=120)
    assert resp.status_code == 200, resp.text
    choices = resp.json()["choices"]
    assert len(choices) == 2 and choices[0]["prompt_logprobs"] == choices[1]["prompt_logprobs"]
    _check_vllm_list(choices[0]["prompt_logprobs"], ids, hf_model, 3)
    assert choices[0]["prompt_logprobs"][1][str(ids[1])]["decoded_token"] is None  # no tokenizer
    plain = httpx.post(tiny_server.base_url + "/v1/completions", json={"prompt": ids, "max_tokens": 1}, timeout=120)
    assert "prompt_logprobs" not in plain.json()["choices"][0]  # left out unless asked


def test_vllm_prompt_logprobs_on_chat(f32, default_llm, smollm2_transformers):
    _, name = f32
    messages = [{"role": "user", "content": "Name three colours."}]
    resp = httpx.post(str(f32[0].base_url) + "chat/completions", timeout=120,
                      json={"model": name, "messages": messages, "max_tokens": 2, "prompt_logprobs": 2})
    assert resp.status_code == 200, resp.text
    data = resp.json()
    tok = default_llm.get_tokenizer()
    ids = tok.encode(tok.apply_chat_template(messages), add_special_tokens=False)
    assert data["usage"]["prompt_tokens"] == len(ids)
    _check_vllm_list(data["prompt_logprobs"], ids, smollm2_transformers, 2)
    pieces = default_llm.engine.tokenizer.token_pieces(ids)
    assert [e[str(t)]["decoded_token"] for e, t in zip(data["prompt_logprobs"][1:], ids[1:])] == pieces[1:]


def test_prompt_logprobs_response_size_is_bounded(tiny_server):
    """512-token context: at most 512 x 21 entries; 300 tokens x 21 x n=2 is refused up front."""
    body = {"prompt": [5] * 300, "max_tokens": 1, "n": 2, "prompt_logprobs": 20}
    resp = httpx.post(tiny_server.base_url + "/v1/completions", json=body, timeout=120)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == "prompt"
    body["n"] = 1
    assert httpx.post(tiny_server.base_url + "/v1/completions", json=body, timeout=120).status_code == 200


def test_streamed_chunks_carry_no_prompt_logprobs_key_without_asking(tiny_server):
    body = {"prompt": [5, 6, 7], "max_tokens": 2, "stream": True}
    with httpx.stream("POST", tiny_server.base_url + "/v1/completions", json=body, timeout=120) as resp:
        lines = [json.loads(line[6:]) for line in resp.iter_lines()
                 if line.startswith("data: ") and line != "data: [DONE]"]
    assert lines and all("prompt_logprobs" not in c for chunk in lines for c in chunk["choices"])


def test_streamed_scoring_is_one_chunk_of_prompt(f32, prompt_ids, default_llm, smollm2_transformers):
    client, name = f32
    chunks = [c for c in client.completions.create(model=name, prompt=PROMPT, max_tokens=0, echo=True, logprobs=0,
                                                   stream=True, stream_options={"include_usage": True})]
    texts = [c.choices[0] for c in chunks if c.choices]
    assert "".join(c.text for c in texts) == PROMPT and texts[-1].finish_reason == "length"
    tokens = [t for c in texts if c.logprobs for t in c.logprobs.tokens]
    assert tokens == default_llm.engine.tokenizer.token_pieces(prompt_ids)
    _check_echoed_prompt(texts[0].logprobs, prompt_ids, default_llm.engine.tokenizer, smollm2_transformers, 0)
    assert chunks[-1].usage.completion_tokens == 0
