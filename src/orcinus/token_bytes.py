"""The bytes a token stands for (OpenAI's log-prob `bytes`).

Decoding one token of a multi-byte character (an emoji is often two to four byte tokens) gives
U+FFFD, whose UTF-8 is [239, 191, 189]: the log-prob `bytes` then said nothing about the token,
although their purpose is to let a client rebuild such characters from consecutive tokens
(issue 19). The bytes come from the token's vocabulary entry instead:

- byte-level BPE (GPT-2, Llama 3, SmolLM2, Qwen): each byte is spelled as one printable
  character (the GPT-2 byte-to-unicode table), so the entry maps back to bytes exactly;
- SentencePiece byte fallback (Llama 2, Mistral): `<0xE2>` entries are single bytes, and `▁`
  is a space;
- anything else (special tokens, other vocabularies): the UTF-8 of the token's decoded text.
"""
from __future__ import annotations

import functools
import re
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from orcinus.tokenizer import Tokenizer

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@functools.lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    """The inverse of GPT-2's byte-to-unicode table: printable bytes stand for themselves, the
    rest (controls, space, some Latin-1) are shifted to code points from 256 up."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def _is_byte_level(tokenizer: "Tokenizer") -> bool:
    backend = tokenizer.backend_tokenizer
    return backend is not None and "ByteLevel" in repr(backend.decoder)


def token_bytes_fn(tokenizer: "Tokenizer | None") -> Callable[[int, str], list[int]]:
    """f(token_id, decoded_text) -> the token's bytes; without a tokenizer, the text's UTF-8."""
    if tokenizer is None:
        return lambda _id, text: list(text.encode("utf-8"))
    byte_level = _is_byte_level(tokenizer)
    table = _unicode_to_byte()
    special = set(getattr(tokenizer.hf, "all_special_ids", []) or [])

    @functools.lru_cache(maxsize=65536)
    def of(token_id: int, text: str) -> tuple[int, ...]:
        if token_id in special:
            return tuple(text.encode("utf-8"))
        piece = tokenizer.convert_ids_to_tokens(token_id)
        if isinstance(piece, str):
            match = _BYTE_TOKEN.fullmatch(piece)
            if match:
                return (int(match.group(1), 16),)
            if byte_level and piece and all(ch in table for ch in piece):
                return tuple(table[ch] for ch in piece)
            if "\ufffd" in text and not byte_level:
                return tuple(piece.replace("\u2581", " ").encode("utf-8"))
        return tuple(text.encode("utf-8"))

    return lambda token_id, text: list(of(token_id, text))
