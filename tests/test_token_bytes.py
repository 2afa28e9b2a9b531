"""Log-prob `bytes` are the token's own bytes (issue 19, finding 5): a token that is part of a
multi-byte character decodes to U+FFFD, whose UTF-8 [239, 191, 189] used to be reported."""
from __future__ import annotations

import pytest

from orcinus.models.loader import default_model_path
from orcinus.request import Logprob
from orcinus.server.logprobs import chat_logprobs
from orcinus.token_bytes import token_bytes_fn
from orcinus.tokenizer import Tokenizer

TEXT = "Smile 😀, café, 日本語 and 🦀!"


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_model_path(default_model_path())


def test_the_tokens_bytes_rebuild_the_text(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    pieces = tokenizer.token_pieces(ids)
    assert "\ufffd" in pieces  # the vocabulary splits the emoji into byte tokens: the case at hand
    to_bytes = token_bytes_fn(tokenizer)
    got = [to_bytes(i, p) for i, p in zip(ids, pieces)]
    assert b"".join(bytes(b) for b in got) == TEXT.encode("utf-8")
    assert [239, 191, 189] not in got


def test_chat_logprobs_report_them(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("😀", add_special_tokens=False)
    entries = [{i: Logprob(i, -0.5, p)} for i, p in zip(ids, tokenizer.token_pieces(ids))]
    out = chat_logprobs(ids, entries, 0, token_bytes_fn(tokenizer))
    assert b"".join(bytes(c.bytes) for c in out.content) == "😀".encode("utf-8")
    assert all(c.token == "\ufffd" for c in out.content if len(c.bytes) == 1)


def test_special_tokens_and_no_tokenizer(tokenizer: Tokenizer) -> None:
    to_bytes = token_bytes_fn(tokenizer)
    eos = tokenizer.eos_token_ids[0]
    piece = tokenizer.token_pieces([eos])[0]
    assert to_bytes(eos, piece) == list(piece.encode("utf-8"))
    assert token_bytes_fn(None)(7, "token_id:7") == list(b"token_id:7")
