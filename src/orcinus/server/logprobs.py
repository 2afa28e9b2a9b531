"""Turning the engine's per-token log-probs into OpenAI's two shapes (legacy completions, chat)."""
from __future__ import annotations

from typing import Callable

from orcinus.request import Logprob
from orcinus.server.protocol import (CompletionLogprobs, ChatLogprobs, PromptLogprob, PromptLogprobsList,
                                     TokenLogprob, TopLogprob)


def _text(lp: Logprob) -> str:
    # No tokenizer (skip_tokenizer_init): name the token by its id, as vLLM does.
    return lp.decoded if lp.decoded is not None else f"token_id:{lp.token_id}"


def _ranked(entry: dict[int, Logprob], chosen: int, k: int) -> list[Logprob]:
    """The k most likely tokens of one position. The engine's dict holds the chosen token first
    and then the top k, so it has k + 1 entries exactly when the chosen token is not among them."""
    ranked = sorted(entry.values(), key=lambda lp: lp.logprob, reverse=True)
    if len(entry) > k:
        ranked = [lp for lp in ranked if lp.token_id != chosen]
    return ranked[:k]


def completion_logprobs(token_ids: list[int], entries: list[dict[int, Logprob]],
                        text_offset: int) -> CompletionLogprobs:
    """Legacy shape: parallel lists; top_logprobs holds the chosen token too (as vLLM and the
    old OpenAI API did), so there can be logprobs + 1 alternatives per position."""
    out = CompletionLogprobs()
    offset = text_offset
    for tok, entry in zip(token_ids, entries):
        chosen = entry.get(tok)
        piece = _text(chosen) if chosen is not None else f"token_id:{tok}"
        out.tokens.append(piece)
        out.token_logprobs.append(chosen.logprob if chosen is not None else None)
        out.top_logprobs.append({_text(lp): lp.logprob for lp in entry.values()})
        out.text_offset.append(offset)
        offset += len(piece)
    return out


def _top_k(entry: dict[int, Logprob], tok: int, k: int) -> list[Logprob]:
    """The token itself and its position's k best: prompt entries may hold more alternatives than
    this field asked for (echo's logprobs and vLLM's prompt_logprobs share one computation)."""
    return [lp for lp in entry.values() if lp.token_id == tok or (lp.rank is not None and lp.rank <= k)]


def prompt_completion_logprobs(prompt_ids: list[int], entries: list[dict[int, Logprob] | None],
                               first_piece: str, k: int) -> CompletionLogprobs:
    """Legacy shape for an echoed prompt, as OpenAI's completions returned it: nothing predicts the
    first token, so its token_logprob and top_logprobs are null. Offsets start at 0, the start of
    the echoed text."""
    out = CompletionLogprobs()
    offset = 0
    for i, tok in enumerate(prompt_ids):
        entry = entries[i] if i < len(entries) else None
        chosen = entry.get(tok) if entry is not None else None
        piece = first_piece if i == 0 else (_text(chosen) if chosen is not None else f"token_id:{tok}")
        out.tokens.append(piece)
        out.token_logprobs.append(chosen.logprob if chosen is not None else None)
        out.top_logprobs.append(None if entry is None else {_text(lp): lp.logprob for lp in _top_k(entry, tok, k)})
        out.text_offset.append(offset)
        offset += len(piece)
    return out


def join_completion_logprobs(first: CompletionLogprobs, second: CompletionLogprobs) -> CompletionLogprobs:
    return CompletionLogprobs(text_offset=first.text_offset + second.text_offset,
                              token_logprobs=first.token_logprobs + second.token_logprobs,
                              tokens=first.tokens + second.tokens, top_logprobs=first.top_logprobs + second.top_logprobs)


def vllm_prompt_logprobs(prompt_ids: list[int], entries: list[dict[int, Logprob] | None] | None,
                         k: int) -> PromptLogprobsList:
    """vLLM's `prompt_logprobs`: None first, then token id -> {logprob, rank, decoded_token}."""
    out: PromptLogprobsList = []
    for i, entry in enumerate(entries or []):
        if entry is None:
            out.append(None)
            continue
        out.append({str(lp.token_id): PromptLogprob(logprob=lp.logprob, rank=lp.rank, decoded_token=lp.decoded)
                    for lp in _top_k(entry, prompt_ids[i], k)})
    return out


def chat_logprobs(token_ids: list[int], entries: list[dict[int, Logprob]], top_k: int,
                  token_bytes: Callable[[int, str], list[int]] | None = None) -> ChatLogprobs:
    """`bytes` are each token's own (token_bytes.py): for a piece of a multi-byte character the
    decoded text is U+FFFD, whose UTF-8 would say nothing about the token."""
    to_bytes = token_bytes or (lambda _id, text: list(text.encode("utf-8")))
    content = []
    for tok, entry in zip(token_ids, entries):
        chosen = entry.get(tok)
        if chosen is None:
            continue
        piece = _text(chosen)
        content.append(TokenLogprob(
            token=piece, logprob=chosen.logprob, bytes=to_bytes(tok, piece),
            top_logprobs=[TopLogprob(token=_text(lp), logprob=lp.logprob, bytes=to_bytes(lp.token_id, _text(lp)))
                          for lp in _ranked(entry, tok, top_k)],
        ))
    return ChatLogprobs(content=content)
