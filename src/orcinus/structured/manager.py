"""The engine's side of structured outputs: compiles specs (cached by spec, safe to call from
the prompt-preparation threads), gives each request its matcher, advances it with each accepted
token, and builds the bitmask that goes with an iteration's message.

Why the mask is built here, when the batch is launched: the engine launches a request's next
iteration only after it has appended the previous token (a RUNNING request is never scheduled
again), so the matcher has seen exactly the request's accepted tokens. A token that is discarded
(the request was aborted, or its text reached a stop string, while the batch was in flight) is
never accepted, so the matcher never runs ahead of the request."""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import Sequence

import numpy as np

from orcinus.structured.backend import CompiledGrammar, GrammarBackend, Matcher
from orcinus.structured.bitmask import TokenBitmask
from orcinus.structured.params import GrammarError, StructuredOutputsParams

logger = logging.getLogger(__name__)

BACKENDS = ("llguidance",)


class StructuredOutputManager:
    def __init__(self, tokenizer, eos_token_ids: Sequence[int], backend: str = "llguidance",
                 cache_size: int = 256) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown structured-output backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        self._tokenizer = tokenizer
        self._eos = tuple(eos_token_ids)
        self._backend_name = backend
        self._backend: GrammarBackend | None = None
        self._cache: OrderedDict[tuple[str, str], CompiledGrammar] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()  # guards the backend's creation and the cache
        self.compiles_total = 0

    @property
    def backend(self) -> GrammarBackend:
        with self._lock:
            if self._backend is None:
                if self._tokenizer is None:
                    raise GrammarError("structured outputs need a tokenizer; this engine runs without one")
                from orcinus.structured.llguidance_backend import LLGuidanceBackend
                self._backend = LLGuidanceBackend(self._tokenizer.hf, self._eos)
            return self._backend

    def compile(self, spec: StructuredOutputsParams) -> CompiledGrammar:
        """The compiled grammar for spec, from the cache when the same spec was compiled before.
        Raises GrammarError naming the problem."""
        key = spec.key()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        compiled = self.backend.compile(spec)  # outside the lock: compiles run in parallel
        with self._lock:
            self.compiles_total += 1
            self._cache[key] = compiled
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return compiled

    def new_matcher(self, spec: StructuredOutputsParams) -> Matcher:
        return self.compile(spec).new_matcher()

    def bitmask(self, rows: Sequence[tuple[str, Matcher]]) -> TokenBitmask | None:
        """The next allowed tokens of each (request id, matcher) about to sample."""
        if not rows:
            return None
        backend = self.backend
        bits = np.full((len(rows), (backend.vocab_size + 31) // 32), -1, dtype=np.int32)
        backend.fill_bitmask([m for _, m in rows], bits)
        return TokenBitmask([rid for rid, _ in rows], bits)
