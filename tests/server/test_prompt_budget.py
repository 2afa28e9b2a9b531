"""A text far too long for the context is refused after tokenising its head only (issue 19,
finding 1: twelve prompts of ~650k characters cost ~20 s of tokenising before the refusal)."""
from __future__ import annotations

import pytest

from orcinus.request import RequestRejected
from orcinus.server.prompt_budget import encode_within
from orcinus.tokenizer import Tokenizer
from orcinus.models.loader import default_model_path


class CountingTokenizer:
    """The real tokenizer, counting the characters it is asked to encode."""

    def __init__(self, inner: Tokenizer) -> None:
        self.inner = inner
        self.chars = 0

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.chars += len(text)
        return self.inner.encode(text, add_special_tokens=add_special_tokens)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_model_path(default_model_path())


def test_a_hopeless_prompt_costs_a_bounded_head(tokenizer: Tokenizer) -> None:
    counting = CountingTokenizer(tokenizer)
    text = "The quick brown fox jumps over the lazy dog. " * 15_000  # ~675k characters, ~150k tokens
    with pytest.raises(RequestRejected, match="context length is 2048") as err:
        encode_within(counting, text, max_model_len=2048)
    assert err.value.param == "prompt"
    assert counting.chars <= 2048 * 8 < len(text) // 40  # the head only, not the whole text


def test_a_prompt_that_fits_is_tokenised_as_before(tokenizer: Tokenizer) -> None:
    text = "word " * 3000  # longer than the head window of a 256-token context, and 3000 tokens: too long
    with pytest.raises(RequestRejected):
        encode_within(tokenizer, text, max_model_len=256)
    fits = "Once upon a time " * 100
    assert encode_within(tokenizer, fits, max_model_len=2048) == tokenizer.encode(fits)
    # A refusal on the head is never wrong: the whole text holds more tokens still.
    long = "a" * 40_000
    with pytest.raises(RequestRejected):
        encode_within(tokenizer, long, max_model_len=4096)
    assert len(tokenizer.encode(long)) > 4096
