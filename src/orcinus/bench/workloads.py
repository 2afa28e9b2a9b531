"""Synthetic traces: the Orca paper's workload and a configurable random one.

A trace is a list of `BenchRequest`s: token-id prompts of a drawn length and a drawn number of
output tokens, always generated to the end (EOS ignored), so every system does the same work.
Everything is drawn from one `random.Random(seed)`, so a trace is a pure function of its settings.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Iterable, Sequence


@dataclass
class BenchRequest:
    prompt_token_ids: list[int]
    output_len: int  # tokens to generate (max_tokens with EOS ignored)
    prompt_text: str | None = None  # real text (ShareGPT); None: send the token ids
    arrival_offset: float = 0.0  # seconds after the start of the run

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)


@dataclass(frozen=True)
class LengthRange:
    """Inclusive integer range, drawn uniformly; written `LO:HI` on the command line (or `N`)."""

    low: int
    high: int

    def __post_init__(self) -> None:
        if self.low < 1 or self.high < self.low:
            raise ValueError(f"length range {self.low}:{self.high} needs 1 <= low <= high")

    @classmethod
    def parse(cls, text: str) -> "LengthRange":
        parts = str(text).split(":")
        if len(parts) == 1:
            return cls(int(parts[0]), int(parts[0]))
        if len(parts) == 2:
            return cls(int(parts[0]), int(parts[1]))
        raise ValueError(f"expected LO:HI or N, got {text!r}")

    def draw(self, rng: random.Random) -> int:
        return rng.randint(self.low, self.high)

    def __str__(self) -> str:
        return f"{self.low}:{self.high}"


# The paper's end-to-end trace (section 6.2): prompts U(32, 512), max_gen_tokens U(1, 128).
ORCA_PROMPT_LEN = LengthRange(32, 512)
ORCA_OUTPUT_LEN = LengthRange(1, 128)
# nano-vllm's / vLLM's offline throughput habit: 256 requests, both lengths U(100, 1024).
RANDOM_NUM_REQUESTS = 256
RANDOM_PROMPT_LEN = LengthRange(100, 1024)
RANDOM_OUTPUT_LEN = LengthRange(100, 1024)


@dataclass
class TokenSampler:
    """Draws prompt token ids uniformly from the vocabulary minus special tokens.

    Special tokens are left out because a random `<|im_start|>` or EOS in a prompt changes what
    some servers do with it (and its text form does not round-trip); ordinary tokens are all alike
    to the model's cost, which is what a throughput benchmark measures.
    """

    vocab_size: int
    excluded: frozenset[int] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        self._allowed: list[int] | None = None
        if self.excluded:
            self._allowed = [t for t in range(self.vocab_size) if t not in self.excluded]
            if not self._allowed:
                raise ValueError("every token id is excluded")

    def sample(self, rng: random.Random, n: int) -> list[int]:
        if self._allowed is None:
            return [rng.randrange(self.vocab_size) for _ in range(n)]
        allowed = self._allowed
        return [allowed[rng.randrange(len(allowed))] for _ in range(n)]


def random_trace(
    num_requests: int,
    prompt_len: LengthRange,
    output_len: LengthRange,
    tokens: TokenSampler,
    seed: int = 0,
    shared_prefix_len: int = 0,
) -> list[BenchRequest]:
    """Independent uniform prompt and output lengths; random token ids; no arrival times yet.

    shared_prefix_len > 0: every prompt starts with the same that many tokens (a system prompt
    all requests share), followed by its own part of `prompt_len` tokens. The prefix comes from a
    generator of its own, so the per-request parts are exactly those of the trace without it.
    """
    if num_requests < 1:
        raise ValueError("num_requests must be at least 1")
    prefix = shared_prefix(shared_prefix_len, tokens, seed)
    rng = random.Random(seed)
    trace: list[BenchRequest] = []
    for _ in range(num_requests):
        p = prompt_len.draw(rng)
        o = output_len.draw(rng)
        trace.append(BenchRequest(prompt_token_ids=prefix + tokens.sample(rng, p), output_len=o))
    return trace


def shared_prefix(length: int, tokens: TokenSampler, seed: int = 0) -> list[int]:
    """The system prompt of a shared-prefix trace: `length` random token ids, a function of the seed."""
    if length < 0:
        raise ValueError("shared prefix length must be non-negative")
    return tokens.sample(random.Random(f"shared-prefix:{seed}"), length)


def orca_trace(num_requests: int, tokens: TokenSampler, seed: int = 0) -> list[BenchRequest]:
    """The Orca paper's synthetic trace; arrivals are added separately (`arrivals.py`)."""
    return random_trace(num_requests, ORCA_PROMPT_LEN, ORCA_OUTPUT_LEN, tokens, seed)


def trace_summary(trace: Sequence[BenchRequest]) -> dict[str, float | int]:
    """Sizes worth printing next to any result, so a reader can tell two traces apart."""
    p = [r.prompt_len for r in trace]
    o = [r.output_len for r in trace]
    return {
        "num_requests": len(trace),
        "prompt_tokens": sum(p),
        "output_tokens": sum(o),
        "mean_prompt_len": sum(p) / len(p) if p else 0.0,
        "mean_output_len": sum(o) / len(o) if o else 0.0,
        "max_prompt_len": max(p, default=0),
        "max_output_len": max(o, default=0),
    }


def special_token_ids(tokenizer: object | None) -> frozenset[int]:
    """Special ids of an orcinus or transformers tokenizer; empty when there is none."""
    if tokenizer is None:
        return frozenset()
    hf = getattr(tokenizer, "hf", tokenizer)
    ids: Iterable[int] = getattr(hf, "all_special_ids", None) or []
    return frozenset(int(i) for i in ids)
