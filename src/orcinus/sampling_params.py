"""Per-request sampling settings, in vLLM's shape and with its defaults."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

from orcinus.errors import SamplingParamsError  # noqa: F401  (re-exported: raised here)


# Integers the engine turns into tensors must fit int32 (top_k) or the generator's 64 bits (seed).
INT32_MAX = 2**31 - 1
# A top_p below this keeps only the most likely token, exactly as any smaller positive value
# would (that token alone holds at least 1/vocabulary >> 1e-6 of the mass); raising it here
# keeps it from rounding to 0 in float32/bfloat16, where p = 0 would mask every token.
MIN_TOP_P = 1e-6
# Penalties divide or multiply logits; beyond 100x either way float16/bfloat16 logits overflow
# and the penalty's sign flips or the row turns to NaN.
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 0.01, 100.0
MAX_LOGPROBS = 20


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to the context length
    # With max_tokens None: stop after at most this many (a server's default bound; it never asks
    # for more than the context has room for, unlike an explicit max_tokens, which is refused then).
    max_tokens_cap: int | None = None
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top logprobs to return per generated token
    # log-probs of the prompt's own tokens (vLLM's): None off; 0 each prompt token's own; k > 0 also
    # the top k of each position. Of the raw model distribution, before any sampling setting.
    prompt_logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # ---- structured outputs and logit bias (issue 20) ----
    # a StructuredOutputsParams, or a dict of its fields (vLLM's shape): the output follows it
    structured_outputs: Any = None
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit, in [-100, 100]

    def __post_init__(self) -> None:
        if isinstance(self.structured_outputs, dict):
            from orcinus.structured.params import StructuredOutputsParams
            self.structured_outputs = StructuredOutputsParams.from_dict(self.structured_outputs)
        if self.logit_bias:
            self.logit_bias = _logit_bias(self.logit_bias)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == 0:
            self.top_k = -1
        self.validate()
        if 0.0 < self.top_p < MIN_TOP_P:
            self.top_p = MIN_TOP_P

    def validate(self) -> None:
        def bad(msg: str, param: str) -> None:
            raise SamplingParamsError(msg, param)

        for name in ("n", "top_k", "max_tokens", "max_tokens_cap", "min_tokens", "seed", "logprobs",
                     "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
                bad(f"{name} must be an integer, got {value!r}", name)
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            if not math.isfinite(float(getattr(self, name))):
                bad(f"{name} must be a finite number, got {getattr(self, name)}", name)
        if self.n < 1:
            bad(f"n must be at least 1, got {self.n}", "n")
        if self.seed is not None and not -(2 ** 63) <= self.seed <= 2 ** 64 - self.n:
            bad(f"seed must be in [-2**63, 2**64 - n], got {self.seed}", "seed")
        if self.temperature < 0:
            bad(f"temperature must be non-negative, got {self.temperature}", "temperature")
        if not 0.0 < self.top_p <= 1.0:
            bad(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        # Above the vocabulary top_k cuts nothing (the sampler treats it as off); the int32
        # bound only keeps the value representable in the sampler's tensors.
        if not (self.top_k == -1 or 1 <= self.top_k <= INT32_MAX):
            bad(f"top_k must be -1 or 0 (off) or in [1, {INT32_MAX}], got {self.top_k}", "top_k")
        if not 0.0 <= self.min_p <= 1.0:
            bad(f"min_p must be in [0, 1], got {self.min_p}", "min_p")
        if not MIN_REPETITION_PENALTY <= self.repetition_penalty <= MAX_REPETITION_PENALTY:
            bad(f"repetition_penalty must be in [{MIN_REPETITION_PENALTY}, {MAX_REPETITION_PENALTY:g}], "
                f"got {self.repetition_penalty}", "repetition_penalty")
        if not -2.0 <= self.presence_penalty <= 2.0:
            bad(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}", "presence_penalty")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            bad(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}", "frequency_penalty")
        if self.max_tokens is not None and not 1 <= self.max_tokens <= INT32_MAX:
            bad(f"max_tokens must be in [1, {INT32_MAX}], got {self.max_tokens}", "max_tokens")
        if not 0 <= self.min_tokens <= INT32_MAX:
            bad(f"min_tokens must be in [0, {INT32_MAX}], got {self.min_tokens}", "min_tokens")
        if self.max_tokens_cap is not None and not 1 <= self.max_tokens_cap <= INT32_MAX:
            bad(f"max_tokens_cap must be in [1, {INT32_MAX}], got {self.max_tokens_cap}", "max_tokens")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})", "min_tokens")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            bad(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}", "logprobs")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= MAX_LOGPROBS:
            bad(f"prompt_logprobs must be in [0, {MAX_LOGPROBS}], got {self.prompt_logprobs}", "prompt_logprobs")
        if any(isinstance(t, bool) or not isinstance(t, numbers.Integral) or not 0 <= t <= INT32_MAX
               for t in self.stop_token_ids or []):
            bad(f"stop_token_ids must be token ids in [0, {INT32_MAX}]", "stop_token_ids")
        if any(not isinstance(s, str) for s in self.stop or []):
            bad("stop must be a string or a list of strings", "stop")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    def clone_for_child(self, index: int) -> "SamplingParams":
        """Settings of the index-th of n parallel samples: n=1, and a distinct derived seed."""
        import dataclasses

        seed = None if self.seed is None else self.seed + index
        return dataclasses.replace(self, n=1, seed=seed)


def _logit_bias(bias: dict) -> dict[int, float]:
    """OpenAI's logit_bias: keys are token ids (JSON gives them as strings), values in [-100, 100]."""
    if not isinstance(bias, dict):
        raise SamplingParamsError("logit_bias must be an object mapping token ids to biases", "logit_bias")
    out: dict[int, float] = {}
    for key, value in bias.items():
        try:
            tid = int(key)
        except (TypeError, ValueError):
            raise SamplingParamsError(f"logit_bias key {key!r} is not a token id", "logit_bias") from None
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)) \
                or not -100 <= float(value) <= 100:
            raise SamplingParamsError(f"logit_bias for token {tid} must be a number in [-100, 100], got {value!r}",
                                      "logit_bias")
        if not 0 <= tid <= INT32_MAX:
            raise SamplingParamsError(f"logit_bias key {tid} is not a token id", "logit_bias")
        out[tid] = float(value)
    return out
