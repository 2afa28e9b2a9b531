"""Tokenising with a bound on the work a prompt that cannot fit may cost.

The character bound checked before tokenising (ServingContext.check_text_length) has to allow
the longest vocabulary piece per token, so text far too long for the context in practice still
passes it: twelve prompts of ~650k characters each cost ~20 s of tokenising before the engine
refused them (issue 19). Here a long text is first tokenised only as far as a window of
`_CHARS_PER_TOKEN` characters per context token; when that head alone already holds more tokens
than the context, the prompt is refused without tokenising the rest. A text that fits is
tokenised whole, as before (its cost is then bounded by the character bound).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from orcinus.request import RequestRejected

if TYPE_CHECKING:
    from orcinus.tokenizer import Tokenizer

# Ordinary text averages 3-5 characters per token; a head this long holds more tokens than the
# context for anything but text of unusually long tokens, which is then tokenised whole.
_CHARS_PER_TOKEN = 8
# Cutting the text can split its last token into a few: never refuse on the cut alone.
_CUT_SLACK_TOKENS = 16


def check_head_fits(tokenizer: "Tokenizer", text: str, max_model_len: int, param: str) -> None:
    """Raise RequestRejected when the text's head already holds more tokens than the context."""
    window = max_model_len * _CHARS_PER_TOKEN
    if len(text) <= window:
        return
    head = len(tokenizer.encode(text[:window], add_special_tokens=False))
    if head > max_model_len + _CUT_SLACK_TOKENS:
        raise RequestRejected(f"the prompt holds more than {head} tokens (counted over its first {window} of "
                              f"{len(text)} characters), but the model's context length is {max_model_len}; "
                              "shorten the prompt", param)


def encode_within(tokenizer: "Tokenizer", text: str, max_model_len: int, param: str = "prompt") -> list[int]:
    """The text's token ids, refusing early (see the module doc) a text that cannot fit."""
    check_head_fits(tokenizer, text, max_model_len, param)
    return tokenizer.encode(text)
