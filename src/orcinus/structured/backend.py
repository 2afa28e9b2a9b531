"""The grammar-backend interface. A backend compiles a spec once (cached by the manager) and
makes a cheap matcher per request; a matcher follows one request's accepted tokens and writes
the next allowed-token set as a bitmask row (bit t of word t // 32 set: token t allowed)."""
from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np

from orcinus.structured.params import StructuredOutputsParams


class Matcher(Protocol):
    def accept(self, token_id: int) -> bool:
        """Advance by one sampled token; False if the grammar does not allow it."""

    def is_terminated(self) -> bool:
        """The grammar is complete and nothing more may follow."""

    def error(self) -> str | None:
        """Why the matcher stopped accepting tokens, if it did."""


class CompiledGrammar(Protocol):
    def new_matcher(self) -> Matcher: ...


class GrammarBackend(Protocol):
    name: str
    vocab_size: int  # bitmask rows cover this many token ids

    def compile(self, spec: StructuredOutputsParams) -> CompiledGrammar:
        """Raises GrammarError naming the problem."""

    def fill_bitmask(self, matchers: Sequence[Matcher], bitmask: np.ndarray) -> None:
        """Row i of bitmask [len(matchers), ceil(vocab_size / 32)] int32 := matcher i's next
        allowed tokens."""
