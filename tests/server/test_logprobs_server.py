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
