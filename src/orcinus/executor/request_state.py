"""What a worker remembers about each request between iterations, and how a batch message
updates it. Every update has an undo record: a failed iteration (here, or on another pipeline
stage) puts the state back as it was before the message, so the engine may retry its rows."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from orcinus.executor.messages import BatchMessage, NewRequestData, SamplingSettings


@dataclass
class WorkerRequest:
    request_id: str
    prompt_token_ids: list[int]
    settings: SamplingSettings
    block_ids: list[int]
    output_token_ids: list[int] = field(default_factory=list)
    # KV positions written before this row's current iteration, which computes the tokens from
    # here on: 0 for a new request, all but the newest token for a running one
    num_computed_tokens: int = 0
    # a seeded request's own generator: its draws do not depend on the rest of the batch
    generator: torch.Generator | None = None
    # this iteration: how many tokens it computes (None: all not yet computed), and whether the
    # last of them is the sequence's last token, so that a token is sampled (a prompt chunk is not)
    num_scheduled: int | None = None
    samples: bool = True
    # prompt_logprobs: the first prompt token whose log-prob is still wanted
    prompt_logprobs_from: int = 1

    @classmethod
    def from_new(cls, data: NewRequestData, device: torch.device,
                 generator: torch.Generator | None = None) -> "WorkerRequest":
        gen = generator
        if gen is None and data.settings.seed is not None:
            gen = torch.Generator(device=device).manual_seed(data.settings.seed)
        return cls(data.request_id, list(data.prompt_token_ids), data.settings, list(data.block_ids),
                   list(data.output_token_ids), data.num_computed_tokens, gen, data.num_new_tokens,
                   data.samples, data.prompt_logprobs_from)

    @property
    def num_new_tokens(self) -> int:
        if self.num_scheduled is None:
            return self.num_tokens - self.num_computed_tokens
        return self.num_scheduled

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def prompt_logprob_positions(self) -> tuple[int, int]:
        """Positions [lo, hi) of this iteration whose logits give wanted prompt log-probs: position
        p predicts prompt token p + 1, so only p < len(prompt) - 1, and from the first one wanted."""
        if self.settings.prompt_logprobs is None:
            return 0, 0
        start = self.num_computed_tokens
        lo = max(start, self.prompt_logprobs_from - 1)
        hi = min(start + self.num_new_tokens, len(self.prompt_token_ids) - 1)
        return (lo, hi) if lo < hi else (0, 0)

    def token_at(self, position: int) -> int:
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[position] if position < n else self.output_token_ids[position - n]


@dataclass
class _Undo:
    added: list[str]
    # (cached request, computed count, scheduled count and samples before, whether a token was appended)
    appended: list[tuple[WorkerRequest, int, int | None, bool, bool]]
    grown: list[tuple[WorkerRequest, int]]  # (request, block count before)
    generator_states: list[tuple[torch.Generator, torch.Tensor]]
    unparked: list[tuple[str, torch.Generator]] = field(default_factory=list)


class RequestStates:
    """The worker's table of live requests, keyed by id."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._reqs: dict[str, WorkerRequest] = {}
        # generators of seeded requests that were preempted, until they are sent again as new
        self._parked: dict[str, torch.Generator] = {}

    def __len__(self) -> int:
        return len(self._reqs)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._reqs

    def get(self, request_id: str) -> WorkerRequest:
        return self._reqs[request_id]

    def apply(self, msg: BatchMessage) -> tuple[list[WorkerRequest], _Undo]:
        """Drop finished ids, register new requests, append each cached request's new token and
        blocks; returns the batch's rows in output order and what undoes the update."""
        for rid in msg.finished_ids:
            self._reqs.pop(rid, None)
            self._parked.pop(rid, None)
        for rid in msg.preempted_ids:
            req = self._reqs.pop(rid, None)
            if req is not None and req.generator is not None:
                self._parked[rid] = req.generator
        undo = _Undo([], [], [], [])
        rows: list[WorkerRequest] = []
        try:
            for data in msg.requests:
                if isinstance(data, NewRequestData):
                    if data.request_id in self._reqs:
                        raise ValueError(f"request {data.request_id!r} is already running on this worker")
                    parked = self._parked.pop(data.request_id, None)
                    if parked is not None:
                        undo.unparked.append((data.request_id, parked))
                    req = WorkerRequest.from_new(data, self.device, parked)
                    self._reqs[req.request_id] = req
                    undo.added.append(req.request_id)
                    rows.append(req)
                    continue
                req = self._reqs.get(data.request_id)
                if req is None:
                    raise KeyError(f"request {data.request_id!r} is unknown to this worker (never sent as new)")
                undo.appended.append((req, req.num_computed_tokens, req.num_scheduled, req.samples,
                                      data.new_token_id is not None))
                # Its previous iteration's tokens are in the KV cache now (a decode step, or a chunk).
                req.num_computed_tokens += req.num_new_tokens
                if data.new_token_id is not None:  # None: its last iteration was a prompt chunk
                    req.output_token_ids.append(data.new_token_id)
                req.num_scheduled, req.samples = data.num_new_tokens, data.samples
                if data.new_block_ids:
                    undo.grown.append((req, len(req.block_ids)))
                    req.block_ids.extend(data.new_block_ids)
                rows.append(req)
        except BaseException:
            self.rollback(undo)
            raise
        # Snapshot seeded generators so that a retried iteration draws the same numbers.
        undo.generator_states = [(r.generator, r.generator.get_state()) for r in rows if r.generator is not None]
        return rows, undo

    def rollback(self, undo: _Undo) -> None:
        for rid in undo.added:
            self._reqs.pop(rid, None)
        for rid, gen in undo.unparked:
            self._parked[rid] = gen
        for req, computed, scheduled, samples, appended in undo.appended:
            if appended:
                req.output_token_ids.pop()
            req.num_computed_tokens, req.num_scheduled, req.samples = computed, scheduled, samples
        for req, n in undo.grown:
            del req.block_ids[n:]
        for gen, state in undo.generator_states:
            gen.set_state(state)
