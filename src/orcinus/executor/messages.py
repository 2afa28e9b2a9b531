"""The engine-to-worker contract: plain, picklable data only (ids, ints, small dataclasses).

One `BatchMessage` per iteration carries the scheduler's decision. A request is described in full
(`NewRequestData`) only the first time a worker sees it; afterwards the message carries the one
token the engine appended since (`CachedRequestData`) and any KV blocks added since. Workers keep
everything else (token history, seeded generators, block tables) and drop it when a later message
lists the id in `finished_ids`. See docs/design.md, "Engine ↔ worker contract".

Every type that crosses the boundary is here, in both directions: the engine's `BatchMessage` (with
each request's `SamplingSettings`) and `Rollback`; the workers' `SamplerOutput`, their first reply
`Ready` (carrying `WorkerInfo`), `Reply` and `Failed`. The same types travel in-process, through
multiprocessing pipes and across machines.
"""
from __future__ import annotations

import pickle
import traceback
from dataclasses import dataclass, field

import numpy as np

from orcinus.config import ModelConfig
from orcinus.sampling_params import SamplingParams


@dataclass(frozen=True)
class SamplingSettings:
    """What a worker needs to sample a request's tokens (no stop strings, no output options)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    min_tokens: int = 0
    logprobs: int | None = None
    # log-probs at the prompt's positions: None off, else how many top alternatives (0: none)
    prompt_logprobs: int | None = None
    # token ids min_tokens holds off: the request's EOS ids and its stop_token_ids
    stop_token_ids: tuple[int, ...] = ()
    # OpenAI's logit_bias as (token id, bias) pairs, added to the logits before sampling
    logit_bias: tuple[tuple[int, float], ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    @classmethod
    def from_params(cls, params: SamplingParams, eos_token_ids: tuple[int, ...] = ()) -> "SamplingSettings":
        stops = tuple(dict.fromkeys((*eos_token_ids, *(params.stop_token_ids or ()))))
        return cls(
            temperature=params.temperature, top_p=params.top_p, top_k=params.top_k, min_p=params.min_p,
            repetition_penalty=params.repetition_penalty, presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty, seed=params.seed, min_tokens=params.min_tokens,
            logprobs=params.logprobs, prompt_logprobs=params.prompt_logprobs, stop_token_ids=stops,
            logit_bias=tuple(sorted((params.logit_bias or {}).items())),
        )


@dataclass
class NewRequestData:
    """A request a worker has not seen (first iteration, or resumed after preemption).

    Its first `num_computed_tokens` tokens already have KV in `block_ids` (a prefix-cache hit);
    the worker computes the next `num_new_tokens` of `prompt_token_ids + output_token_ids` (None:
    all the rest) and samples only if that reaches the end (`samples`)."""

    request_id: str
    prompt_token_ids: list[int]
    settings: SamplingSettings
    block_ids: list[int]
    output_token_ids: list[int] = field(default_factory=list)  # non-empty only when resumed
    num_computed_tokens: int = 0
    num_new_tokens: int | None = None
    samples: bool = True
    # with settings.prompt_logprobs: the first prompt token whose log-probs are still wanted (1 at
    # first; later after a preemption, so a recomputation does not send them twice)
    prompt_logprobs_from: int = 1


@dataclass
class CachedRequestData:
    """A request the worker holds. `new_token_id` is the token sampled for it in its previous
    iteration (None when that iteration was a prompt chunk that sampled nothing); the worker
    computes its next `num_new_tokens` tokens (1 while decoding, more for the next prompt chunk)
    and samples only if they reach the end (`samples`)."""

    request_id: str
    new_token_id: int | None
    new_block_ids: list[int] = field(default_factory=list)  # appended to its block table
    num_new_tokens: int = 1
    samples: bool = True


RequestData = NewRequestData | CachedRequestData


@dataclass
class BatchMessage:
    """One iteration. Workers apply `finished_ids` first (an id may be reused right away), then
    run `requests` in order (the scheduler's order); outputs come back one row per request that
    samples (`sampled_ids`), in that order. `preempted_ids`: requests whose KV blocks were taken
    back; workers drop their state but keep a seeded request's generator, so that when it is sent
    again as new (to recompute its tokens) its random stream continues where it stopped."""

    batch_id: int
    requests: list[RequestData] = field(default_factory=list)
    finished_ids: list[str] = field(default_factory=list)
    preempted_ids: list[str] = field(default_factory=list)
    seq: int = 0  # stamped by the executor: unique per message sent, names it in a rollback
    # set by the engine when an observer wants phase timings: the worker reports its own in the
    # reply (`SamplerOutput.phases`); off, it times nothing
    timed: bool = False
    # allowed tokens of the constrained requests that sample in this iteration (a
    # structured.bitmask.TokenBitmask: request ids and int32 words), None when none is constrained
    token_bitmask: object | None = None

    @property
    def request_ids(self) -> list[str]:
        return [r.request_id for r in self.requests]

    @property
    def sampled_ids(self) -> list[str]:
        return [r.request_id for r in self.requests if r.samples]

    @property
    def num_requests(self) -> int:
        return len(self.requests)


@dataclass
class Rollback:
    """Undo message `seq` on every rank that applied it: it failed on another rank or stage."""

    seq: int


@dataclass
class WorkerPhases:
    """Where one iteration's time went on the worker that sampled it (the forward thread, possibly
    another process), for a message with `timed` set: phase -> host wall seconds ("input
    preparation", "forward", "sampling"), and on CUDA the GPU time between CUDA events recorded
    on the forward thread's stream at the start and end of "forward" and "sampling"."""

    seconds: dict[str, float] = field(default_factory=dict)
    device_seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class PromptLogprobsChunk:
    """Log-probs of prompt tokens `start .. start + m - 1` of one request, from the logits of the
    positions before them that this iteration computed (a prompt may take several iterations).
    Of the raw model distribution; numpy arrays, so no tensor crosses the boundary."""

    start: int  # index in the prompt of the first token covered (>= 1)
    token_logprobs: np.ndarray  # [m] float32: each prompt token's own log-prob
    ranks: np.ndarray  # [m] int64: its rank (1 = most likely)
    top_ids: np.ndarray  # [m, k] int64: the k most likely tokens, best first (k may be 0)
    top_logprobs: np.ndarray  # [m, k] float32

    def __len__(self) -> int:
        return len(self.token_logprobs)


@dataclass
class SamplerOutput:
    """The tokens of one iteration, one row per request that samples (`BatchMessage.sampled_ids`)."""

    token_ids: list[int]  # one sampled token per row
    # log-prob of the sampled token under the raw distribution (log_softmax of the raw logits)
    logprobs: list[float]
    # per row: the top-k {token_id: logprob} of the raw distribution, highest first, when
    # sampling_params.logprobs is set (k = that number; 0 gives an empty dict), else None
    top_logprobs: list[dict[int, float] | None]
    phases: WorkerPhases | None = None  # only when the message was `timed`
    # request id -> its prompt log-probs computed in this iteration (any row, sampling or not)
    prompt_logprobs: dict[str, PromptLogprobsChunk] = field(default_factory=dict)


@dataclass
class WorkerInfo:
    """What a worker resolved and loaded, reported once when it is ready: the engine sizes its block
    manager and writes its start-up line from this, without importing the worker's insides."""

    num_blocks: int  # KV blocks this rank can hold (the executor takes the minimum over ranks)
    model_config: ModelConfig
    model_path: str  # the resolved checkpoint folder or .gguf file
    device: str  # e.g. "cpu", "cuda:0"
    dtype: str  # e.g. "float32", "bfloat16"
    dtype_note: str  # why dtype="auto" chose it on CPU; empty where the user chose
    cuda_graphs: str  # the CUDA-graph plan in words: "on (...)" or "off (reason)"
    # a GGUF file's general.sampling.* metadata (the model's sampling defaults); empty otherwise
    gguf_sampling: dict = field(default_factory=dict)
    kv_dtype: str = ""  # the KV pool's element type, e.g. "float16"


@dataclass
class Ready:
    """First reply of a worker process: what it resolved, and its pid."""

    info: WorkerInfo
    pid: int

    @property
    def num_blocks(self) -> int:
        return self.info.num_blocks


@dataclass
class Reply:
    """A rank's answer to one message: the tokens (last stage, first tensor-parallel rank only)
    and when this rank started and finished its part (for pipelining measurements)."""

    output: SamplerOutput | None
    stage: int
    seq: int
    started: float  # time.monotonic(), comparable across processes of one machine
    finished: float


@dataclass
class Failed:
    """An error on a worker, as text plus the exception when it pickles."""

    kind: str
    message: str
    detail: str
    exception: BaseException | None = None

    @classmethod
    def of(cls, exc: BaseException) -> "Failed":
        try:
            pickle.dumps(exc)
            carried = exc
        except Exception:
            carried = None
        return cls(type(exc).__name__, str(exc), traceback.format_exc(), carried)

    def to_exception(self) -> BaseException:
        return self.exception if self.exception is not None else RuntimeError(f"{self.kind}: {self.message}")
