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

    @classmethod
    def from_new(cls, data: NewRequestData, device: torch.device) -> "WorkerRequest":
        gen = None
        if data.settings.seed is not None:
            gen = torch.Generator(device=device).manual_seed(data.settings.seed)
        return cls(data.request_id, list(data.prompt_token_ids), data.settings, list(data.block_ids),
                   list(data.output_token_ids), 0, gen)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_at(self, position: int) -> int:
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[position] if position < n else self.output_token_ids[position - n]


@dataclass
class _Undo:
    added: list[str]
    appended: list[tuple[WorkerRequest, int]]  # (request given one output token, computed count before)
    grown: list[tuple[WorkerRequest, int]]  # (request, block count before)
    generator_states: list[tuple[torch.Generator, torch.Tensor]]


class RequestStates:
    """The worker's table of live requests, keyed by id."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._reqs: dict[str, WorkerRequest] = {}

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
        undo = _Undo([], [], [], [])
        rows: list[WorkerRequest] = []
        try:
            for data in msg.requests:
                if isinstance(data, NewRequestData):
                    if data.request_id in self._reqs:
                        raise ValueError(f"request {data.request_id!r} is already running on this worker")
                    req = WorkerRequest.from_new(data, self.device)
                    self._reqs[req.request_id] = req
                    undo.added.append(req.request_id)
                    rows.append(req)
                    continue
                req = self._reqs.get(data.request_id)
                if req is None:
                    raise KeyError(f"request {data.request_id!r} is unknown to this worker (never sent as new)")
                undo.appended.append((req, req.num_computed_tokens))
                req.output_token_ids.append(data.new_token_id)
                # Everything before the new token is in the KV cache: it is what this row computes.
                req.num_computed_tokens = req.num_tokens - 1
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
        for req, computed in undo.appended:
            req.output_token_ids.pop()
            req.num_computed_tokens = computed
        for req, n in undo.grown:
            del req.block_ids[n:]
        for gen, state in undo.generator_states:
            gen.set_state(state)
