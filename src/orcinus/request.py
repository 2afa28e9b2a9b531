"""A request's life inside the engine, and the outputs handed back to callers."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from orcinus.errors import RequestRejected  # noqa: F401  (re-exported: raised here)
from orcinus.sampling_params import SamplingParams


class RequestState(enum.Enum):
    INITIATION = "initiation"  # waiting, never scheduled: its prompt is still to be processed
    RUNNING = "running"  # in a batch that is in flight
    INCREMENT = "increment"  # has run, waits for its next iteration
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the context length
    ABORT = "abort"


@dataclass
class Logprob:
    token_id: int
    logprob: float
    decoded: str | None = None
    # 1 for the most likely token; known for prompt log-probs and top-k alternatives (None where
    # it was not computed: a sampled token's own rank)
    rank: int | None = None


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    prompt: str | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    eos_token_ids: tuple[int, ...] = ()
    max_new_tokens: int = 16  # resolved: sampling_params.max_tokens or what the context allows

    state: RequestState = RequestState.INITIATION
    output_token_ids: list[int] = field(default_factory=list)
    # KV positions already written: the next iteration processes tokens from here on
    num_computed_tokens: int = 0
    num_iterations: int = 0
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    # per generated token: (logprob of the chosen token, top-k alternatives)
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    output_text: str = ""
    # the stop string its text reached while it was already in the next launched batch: it finishes
    # when that batch returns, whose token for it is discarded
    stop_string_hit: str | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    # prompt_logprobs: one entry per prompt token whose log-probs have come back (None first: no
    # position predicts the first token; then the token itself, then the top-k alternatives),
    # empty when not asked; a recomputation after preemption appends only what is missing
    prompt_logprobs: list[dict[int, Logprob] | None] = field(default_factory=list)
    # filled by the engine: per-request random generator for a fixed seed
    generator: object | None = None
    # structured outputs: the grammar matcher, advanced with each accepted token (engine side)
    matcher: object | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def max_total_tokens(self) -> int:
        """Orca's `max_tokens`: prompt plus the most tokens it may generate (its worst-case KV need).

        Named apart from `SamplingParams.max_tokens`, which (as in OpenAI's API) counts new tokens only."""
        return len(self.prompt_token_ids) + self.max_new_tokens

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Asked for prompt log-probs and some are still missing: its prompt must be computed
        (not taken from the prefix cache) from the first missing position on."""
        return self.sampling_params.prompt_logprobs is not None and \
            len(self.prompt_logprobs) < len(self.prompt_token_ids)

    def samples_after(self, num_new_tokens: int) -> bool:
        """Whether an iteration computing `num_new_tokens` more positions samples a token: only the
        chunk that reaches the end of the sequence does (a prompt chunk short of it does not)."""
        return self.num_computed_tokens + num_new_tokens == self.num_tokens

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_finished(self) -> bool:
        return self.state == RequestState.FINISHED


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_token_time: float | None
    finished_time: float | None
    num_iterations: int


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    # with SamplingParams.prompt_logprobs: aligned with prompt_token_ids, None first (see PromptLogprobs)
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
