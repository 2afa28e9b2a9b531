"""Log-probs through a real `orcinus serve` process equal transformers' at every generated
position: the chosen token's and the top alternatives, streamed and not, greedy and sampled."""
from __future__ import annotations

import json

import httpx
import pytest
import torch

from references import reference_logprobs

K = 4
PROMPT = [5, 9, 11, 40, 7, 100, 3]


def _token_id(piece: str) -> int:
    assert piece.startswith("token_id:"), piece  # no tokenizer: tokens are named by id
    return int(piece.split(":", 1)[1])


def _check(hf_model, prompt: list[int], tokens: list[str], token_logprobs: list[float],
           top_logprobs: list[dict[str, float]]) -> None:
    ids = [_token_id(t) for t in tokens]
    ref = reference_logprobs(hf_model, prompt, ids)
    assert len(ids) == len(token_logprobs) == len(top_logprobs) == ref.shape[0]
    for pos, (tok, lp, top) in enumerate(zip(ids, token_logprobs, top_logprobs)):
        assert lp == pytest.approx(float(ref[pos, tok]), abs=1e-4), pos
        best = torch.topk(ref[pos], K)
        got = {_token_id(t): v for t, v in top.items()}
        # The legacy shape lists the top K plus the chosen token when it is not among them.
        assert set(got) == set(best.indices.tolist()) | {tok}, pos
        for t, v in got.items():
            assert v == pytest.approx(float(ref[pos, t]), abs=1e-4), (pos, t)


@pytest.mark.parametrize("sampling", [{"temperature": 0.0}, {"temperature": 1.0, "seed": 11}])
def test_completion_logprobs_match_transformers(tiny_server, checkpoint_factory, sampling: dict) -> None:
    _, hf_model = checkpoint_factory("llama")
    body = {"prompt": PROMPT, "max_tokens": 8, "logprobs": K, "ignore_eos": True, **sampling}
    resp = httpx.post(tiny_server.base_url + "/v1/completions", json=body, timeout=120)
    assert resp.status_code == 200, resp.text
    lp = resp.json()["choices"][0]["logprobs"]
    _check(hf_model, PROMPT, lp["tokens"], lp["token_logprobs"], lp["top_logprobs"])


def test_streamed_logprobs_match_transformers(tiny_server, checkpoint_factory) -> None:
    _, hf_model = checkpoint_factory("llama")
    body = {"prompt": PROMPT, "max_tokens": 8, "logprobs": K, "ignore_eos": True, "temperature": 0.0, "stream": True}
    tokens, token_lps, tops = [], [], []
    with httpx.stream("POST", tiny_server.base_url + "/v1/completions", json=body, timeout=120) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for choice in json.loads(line[6:])["choices"]:
                if choice.get("logprobs"):
                    tokens += choice["logprobs"]["tokens"]
                    token_lps += choice["logprobs"]["token_logprobs"]
                    tops += choice["logprobs"]["top_logprobs"]
    assert len(tokens) == 8
    _check(hf_model, PROMPT, tokens, token_lps, tops)


def test_chat_logprobs_of_the_default_model_match_transformers(float32_cpu_server, default_llm,
                                                              smollm2_transformers) -> None:
    """The chat shape (its own code: a ranked list of the most likely tokens) on the
    real default model: transformers' greedy path gives the tokens, their log-probs and the top 3."""
    messages = [{"role": "user", "content": "Name three colours."}]
    body = {"messages": messages, "max_tokens": 8, "temperature": 0.0, "logprobs": True, "top_logprobs": 3,
            "ignore_eos": True}
    resp = httpx.post(float32_cpu_server.base_url + "/v1/chat/completions", json=body, timeout=120)
    assert resp.status_code == 200, resp.text
    content = resp.json()["choices"][0]["logprobs"]["content"]
    tok = default_llm.get_tokenizer()
    prompt = tok.encode(tok.apply_chat_template(messages), add_special_tokens=False)
    with torch.no_grad():
        out = smollm2_transformers.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                                            dtype=torch.long), max_new_tokens=8, min_new_tokens=8, do_sample=False,
                                            pad_token_id=2)
    ids = out[0, len(prompt):].tolist()
    ref = reference_logprobs(smollm2_transformers, prompt, ids)
    assert len(content) == len(ids) == 8
    for pos, (entry, tid) in enumerate(zip(content, ids)):
        assert entry["token"] == tok.decode([tid]), pos
        assert entry["bytes"] == list(entry["token"].encode("utf-8"))
        assert entry["logprob"] == pytest.approx(float(ref[pos, tid]), abs=2e-3), pos
        best = torch.topk(ref[pos], 3)
        # OpenAI's shape: the 3 most likely tokens at this position, best first (greedy: the chosen one leads)
        others = list(zip(best.indices.tolist(), best.values.tolist()))
        assert others[0][0] == tid
        assert [a["token"] for a in entry["top_logprobs"]] == [tok.decode([t]) for t, _ in others], pos
        for alt, (_, v) in zip(entry["top_logprobs"], others):
            assert alt["logprob"] == pytest.approx(v, abs=2e-3), pos


def test_chat_logprob_bytes_are_each_tokens_own(http: httpx.Client) -> None:
    """Issue 19: over the real server, the tokens' bytes put together are exactly the reply's
    UTF-8, emoji included (a piece of one used to report U+FFFD's bytes)."""
    body = {"messages": [{"role": "user", "content": "Reply with three emoji and nothing else: 😀🦀🎉"}],
            "logprobs": True, "top_logprobs": 2, "max_tokens": 24, "temperature": 0}
    resp = http.post("/v1/chat/completions", json=body)
    assert resp.status_code == 200, resp.text
    choice = resp.json()["choices"][0]
    content = choice["logprobs"]["content"]
    joined = b"".join(bytes(c["bytes"]) for c in content)
    assert joined == choice["message"]["content"].encode("utf-8")
    assert all(len(t["bytes"]) > 0 for c in content for t in c["top_logprobs"])
