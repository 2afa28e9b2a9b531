"""llguidance as the grammar backend (chosen by measurement: docs/benchmarks.md, "Grammar
backends"; why in docs/design.md, "Structured outputs").

It reads the vocabulary from the Rust `tokenizers` JSON, which both of orcinus's tokenizers
have: a Hugging Face `tokenizer.json` and the fast tokenizer transformers builds from a GGUF
file's vocabulary and merges. Compiling makes one template matcher per grammar; each request
gets a deep copy of it (microseconds, the lexer and parser tables are shared)."""
from __future__ import annotations

import copy
import json
from typing import Sequence

import numpy as np

from orcinus.structured.params import DEFAULT_JSON_WHITESPACE, GrammarError, StructuredOutputsParams


class LLGuidanceMatcher:
    __slots__ = ("_m",)

    def __init__(self, matcher) -> None:
        self._m = matcher

    def accept(self, token_id: int) -> bool:
        return bool(self._m.consume_token(token_id))

    def is_terminated(self) -> bool:
        return bool(self._m.is_stopped())

    def error(self) -> str | None:
        return self._m.get_error() or None if self._m.is_error() else None


class LLGuidanceGrammar:
    def __init__(self, template) -> None:
        self._template = template

    def new_matcher(self) -> LLGuidanceMatcher:
        return LLGuidanceMatcher(self._template.deep_copy())


def grammar_text(spec: StructuredOutputsParams) -> str:
    """The spec as an llguidance grammar (its JSON envelope)."""
    import llguidance

    kind = spec.kind
    if kind in ("json", "json_object"):
        schema = {"type": "object"} if kind == "json_object" else spec.json
        ws = {"whitespace_flexible": False} if spec.disable_any_whitespace else \
            {"whitespace_pattern": spec.whitespace_pattern or DEFAULT_JSON_WHITESPACE}
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=ws)
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(spec.regex)
    if kind == "choice":
        # Lark string literals take JSON's escapes, so json.dumps quotes any choice safely.
        return llguidance.LLMatcher.grammar_from_lark(
            "start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in spec.choice))
    text = spec.grammar
    if "::=" in text:  # GBNF (llama.cpp's dialect): llguidance converts it to Lark
        from llguidance.gbnf_to_lark import gbnf_to_lark
        try:
            text = gbnf_to_lark(text)
        except Exception as exc:
            raise GrammarError(f"the GBNF grammar cannot be converted: {exc}", spec.param) from exc
    return llguidance.LLMatcher.grammar_from_lark(text)


class LLGuidanceBackend:
    name = "llguidance"

    def __init__(self, hf_tokenizer, eos_token_ids: Sequence[int], vocab_size: int | None = None) -> None:
        import llguidance
        import llguidance.numpy  # noqa: F401  (the bitmask helpers)

        backend = getattr(hf_tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise GrammarError("structured outputs need a fast (Rust) tokenizer; this model's is a slow one")
        backend = copy.copy(backend)
        backend.no_padding()
        backend.no_truncation()
        self._llg = llguidance
        # Every id that ends a turn: the grammar allows them once it is complete.
        self.tokenizer = llguidance.LLTokenizer(backend.to_str(), n_vocab=vocab_size,
                                                eos_token=list(eos_token_ids) or None)
        self.vocab_size = self.tokenizer.vocab_size

    def compile(self, spec: StructuredOutputsParams) -> LLGuidanceGrammar:
        try:
            text = grammar_text(spec)
        except GrammarError:
            raise
        except Exception as exc:  # the helpers raise on shapes they cannot wrap
            raise GrammarError(f"invalid {spec.kind}: {exc}", spec.param) from exc
        matcher = self._llg.LLMatcher(self.tokenizer, text)
        if matcher.is_error():
            raise GrammarError(f"invalid {_what(spec)}: {_first_lines(matcher.get_error())}", spec.param)
        return LLGuidanceGrammar(matcher)

    def fill_bitmask(self, matchers: Sequence[LLGuidanceMatcher], bitmask: np.ndarray) -> None:
        # Row by row on this thread. llguidance's thread pool (fill_next_token_bitmask_par) lost
        # badly on a busy 2-core machine: 64 rows of a 20-field schema took 11.5 ms a step against
        # 0.67 ms in a loop (docs/benchmarks.md, "Grammar backends"); a JSON mask costs ~10 us.
        fill = self._llg.numpy.fill_next_token_bitmask
        for i, m in enumerate(matchers):
            fill(m._m, bitmask, i)


def _what(spec: StructuredOutputsParams) -> str:
    return {"json": "JSON schema", "json_object": "JSON", "regex": "regex", "choice": "choice",
            "grammar": "grammar"}[spec.kind]


def _first_lines(text: str, n: int = 6) -> str:
    lines = text.strip().splitlines()
    return "\n".join(lines[:n]) + (" ..." if len(lines) > n else "")
