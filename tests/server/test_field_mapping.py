"""Every request field that maps onto SamplingParams has its effect, end to end through a real
`orcinus serve` (tiny random llama, token-id prompts). A field the server dropped on the way to
the engine would leave the output as if it were unset, and the matching test here would fail:
each effect is checked against a reference computed from transformers' logits, and each
scenario is first shown to differ from the output without the field."""
from __future__ import annotations

import httpx
import pytest

from references import (ban_until, frequency_presence_penalty, reference_greedy, repetition_penalty)

# A prompt whose greedy continuation repeats tokens, so that every penalty has something to act on.
PROMPT = [127, 266, 152, 186, 311, 123, 77, 60, 13]
N = 12


def _complete(server, **fields) -> dict:
    body = {"prompt": PROMPT, "max_tokens": N, "ignore_eos": True, **fields}
    resp = httpx.post(server.base_url + "/v1/completions", json=body, timeout=120)
    assert resp.status_code == 200, resp.text
    return resp.json()["choices"][0]


def _ids(choice: dict) -> list[int]:
    return [int(t.split(":", 1)[1]) for t in choice["logprobs"]["tokens"]]


def _tokens(server, **fields) -> list[int]:
    return _ids(_complete(server, logprobs=0, **fields))


@pytest.fixture(scope="module")
def hf(checkpoint_factory):
    return checkpoint_factory("llama")[1]


@pytest.fixture(scope="module")
def greedy(tiny_server, hf) -> list[int]:
    out = _tokens(tiny_server, temperature=0.0)
    assert out == reference_greedy(hf, PROMPT, N)
    return out


def test_seed_makes_sampling_reproducible(tiny_server) -> None:
    a = _tokens(tiny_server, temperature=1.0, seed=1234)
    assert _tokens(tiny_server, temperature=1.0, seed=1234) == a
    assert _tokens(tiny_server, temperature=1.0, seed=4321) != a


@pytest.mark.parametrize("field", [{"top_k": 1}, {"min_p": 1.0}])
def test_top_k_and_min_p_narrow_sampling_to_the_best_token(tiny_server, greedy, field: dict) -> None:
    # At a high temperature the unfiltered draw leaves the greedy path (same seed, so no luck involved) ...
    assert _tokens(tiny_server, temperature=3.0, seed=5) != greedy
    # ... while top_k=1 or min_p=1 leaves only the most likely token to draw.
    assert _tokens(tiny_server, temperature=3.0, seed=5, **field) == greedy


def test_repetition_penalty(tiny_server, hf, greedy) -> None:
    want = reference_greedy(hf, PROMPT, N, repetition_penalty(1.8))
    assert want != greedy
    assert _tokens(tiny_server, temperature=0.0, repetition_penalty=1.8) == want


@pytest.mark.parametrize("frequency,presence", [(1.5, 0.0), (0.0, 1.5), (-1.0, 0.7)])
def test_frequency_and_presence_penalties(tiny_server, hf, greedy, frequency: float, presence: float) -> None:
    want = reference_greedy(hf, PROMPT, N, frequency_presence_penalty(frequency, presence))
    assert want != greedy
    got = _tokens(tiny_server, temperature=0.0, frequency_penalty=frequency, presence_penalty=presence)
    assert got == want


def test_stop_token_ids(tiny_server, greedy) -> None:
    stop = greedy[4]
    choice = _complete(tiny_server, temperature=0.0, logprobs=0, stop_token_ids=[stop])
    first = greedy.index(stop)
    assert _ids(choice) == greedy[:first + 1]
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == stop


def test_min_tokens_holds_off_a_stop_token(tiny_server, hf, greedy) -> None:
    stop = greedy[0]  # greedy would stop at once
    want = reference_greedy(hf, PROMPT, N, ban_until((stop,), 5), stop_ids=(stop,))
    assert len(want) >= 5 and stop not in want[:5]
    choice = _complete(tiny_server, temperature=0.0, logprobs=0, stop_token_ids=[stop], min_tokens=5)
    assert _ids(choice) == want
    assert len(_tokens(tiny_server, temperature=0.0, stop_token_ids=[stop])) == 1  # without min_tokens
