"""Scheduling policies: the only place that decides which requests run in an iteration.

The scheduler knows requests and KV blocks, never tensors. Each call to `schedule()` selects one
batch (Orca's `select`), reserves KV space for newcomers and marks the batch RUNNING; the engine
runs it, appends tokens, marks finished requests, and hands the batch back with `finish_batch()`.
Up to `n_workers` batches may be in flight at once; they always hold disjoint requests because a
RUNNING request is never a candidate.
"""
from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from dataclasses import dataclass

from orcinus.core.kv_cache import KVCacheManager, PrefixHit
from orcinus.request import FinishReason, Request, RequestRejected, RequestState


@dataclass
class ScheduledBatch:
    batch_id: int
    requests: list[Request]
    # per request: how many tokens it brings (whole prompt in initiation, 1 in increment)
    num_new_tokens: list[int]

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)


class Scheduler(ABC):
    def __init__(
        self,
        kv_cache: KVCacheManager,
        max_num_seqs: int,
        max_model_len: int,
        max_num_batched_tokens: int | None = None,
    ) -> None:
        self.kv_cache = kv_cache
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.max_num_batched_tokens = max_num_batched_tokens
        self.pool: dict[str, Request] = {}  # insertion order == arrival order
        self._batch_ids = itertools.count()
        self._abort_after_return: set[str] = set()

    # ----------------------------------------------------------------- admission
    def check_admissible(self, request: Request) -> None:
        """Reject at submission a request that could never run, instead of letting it wait forever."""
        if request.num_prompt_tokens == 0:
            raise RequestRejected("the prompt is empty; give at least one token", "prompt")
        if request.max_total_tokens > self.max_model_len:
            raise RequestRejected(
                f"this request needs {request.max_total_tokens} tokens ({request.num_prompt_tokens} in the "
                f"prompt + max_tokens {request.max_new_tokens}), but the model's context length is "
                f"{self.max_model_len}; shorten the prompt or lower max_tokens",
                "max_tokens",
            )
        if self.kv_cache.blocks_needed(request.max_total_tokens) > self.kv_cache.num_blocks:
            raise RequestRejected(
                f"this request needs {request.max_total_tokens} KV slots ({request.num_prompt_tokens} in the "
                f"prompt + max_tokens {request.max_new_tokens}), but the whole KV cache holds "
                f"{self.kv_cache.n_slots}; lower max_tokens or raise kv_cache_memory",
                "max_tokens",
            )

    def add_request(self, request: Request) -> None:
        self.check_admissible(request)
        self.pool[request.request_id] = request

    # ----------------------------------------------------------------- selection
    @abstractmethod
    def _candidates(self) -> list[Request]:
        """Requests that may join the next batch, in the order the policy considers them."""

    def schedule(self) -> ScheduledBatch | None:
        """Orca's select(): returns the next batch, or None when nobody can run.

        With a token budget (max_num_batched_tokens) requests already past their prompt go first,
        one token each; prompts fill what is left, and a prompt longer than that runs in chunks
        over several iterations (only the last chunk samples a token)."""
        batch: list[Request] = []
        num_new: list[int] = []
        left = self.max_num_batched_tokens
        candidates = self._candidates()
        if left is not None:
            candidates = running_first(candidates)
        for req in candidates:
            if len(batch) == self.max_num_seqs or left == 0:
                break
            n = self._reserve(req, left, batch)
            if n is None:
                break
            if n == 0:
                continue
            batch.append(req)
            num_new.append(n)
            if left is not None:
                left -= n
        if not batch:
            return None
        for req in batch:
            req.state = RequestState.RUNNING
        return ScheduledBatch(next(self._batch_ids), batch, num_new)

    def _reserve(self, req: Request, left: int | None, batch: list[Request]) -> int | None:
        """KV space for what `req` brings next. Returns how many tokens it brings, 0 to skip it this
        iteration, None to stop selecting."""
        if req.state == RequestState.INITIATION and not self.kv_cache.holds(req.request_id):
            # Orca reserves the worst case up front; *stop*, not skip, so FCFS holds.
            worst = req.num_prompt_tokens + req.max_new_tokens
            hit = self._cached_prefix(req)
            if not self.kv_cache.can_admit(hit, worst):
                return None
            self.kv_cache.admit(req.request_id, hit, worst, req.num_prompt_tokens)
            req.num_computed_tokens = hit.num_tokens(self.kv_cache.block_size)
        n = req.num_tokens - req.num_computed_tokens
        if left is not None:
            n = min(n, left)
        self.kv_cache.cache_full_blocks(req.request_id, req.all_token_ids, req.num_computed_tokens + n)
        return n

    def _cached_prefix(self, req: Request) -> PrefixHit:
        """The cached prefix `req` may reuse. Positions whose logits must give prompt log-probs
        are computed, never taken from the cache (which holds KV, not logits): with p prompt
        tokens scored so far, position p - 1 scores the next one, so at most p - 1 tokens reuse."""
        tokens = req.all_token_ids
        if req.needs_prompt_logprobs:
            tokens = tokens[:len(req.prompt_logprobs)]  # cached_prefix leaves the last token out
        return self.kv_cache.cached_prefix(tokens)

    # ----------------------------------------------------------------- completion
    def finish_batch(self, batch: ScheduledBatch) -> list[Request]:
        """A batch came back: requests the engine marked finished leave now and free their blocks."""
        done: list[Request] = []
        for req in batch.requests:
            if req.request_id in self._abort_after_return:
                self._abort_after_return.discard(req.request_id)
                if not req.is_finished:
                    self._mark_finished(req, FinishReason.ABORT)
            if req.is_finished:
                self._release(req)
                done.append(req)
            else:
                req.state = RequestState.INCREMENT
        self._on_batch_returned(batch)
        return done

    def abort(self, request_id: str) -> Request | None:
        """Abort now if the request is not in flight, else as soon as its batch returns."""
        req = self.pool.get(request_id)
        if req is None:
            return None
        if req.state == RequestState.RUNNING:
            self._abort_after_return.add(request_id)
            return None
        self._mark_finished(req, FinishReason.ABORT)
        self._release(req)
        return req

    def fail_batch(self, batch: ScheduledBatch) -> list[Request]:
        """A batch whose iteration failed: abort all of its requests and free their blocks."""
        for req in batch.requests:
            if not req.is_finished:
                self._mark_finished(req, FinishReason.ABORT)
            self._abort_after_return.discard(req.request_id)
            self.kv_cache.forget_blocks(req.request_id)  # their KV may be half written
            self._release(req)
        self._on_batch_returned(batch)
        return list(batch.requests)

    @staticmethod
    def _mark_finished(req: Request, reason: FinishReason) -> None:
        import time

        req.state = RequestState.FINISHED
        req.finish_reason = reason
        req.finished_time = time.monotonic()

    def _release(self, req: Request) -> None:
        req.state = RequestState.FINISHED
        self.pool.pop(req.request_id, None)
        self.kv_cache.free(req.request_id)

    def _on_batch_returned(self, batch: ScheduledBatch) -> None:
        pass

    # ----------------------------------------------------------------- introspection
    @property
    def num_running(self) -> int:
        return sum(1 for r in self.pool.values() if r.state != RequestState.INITIATION)

    @property
    def num_waiting(self) -> int:
        return sum(1 for r in self.pool.values() if r.state == RequestState.INITIATION)

    def has_unfinished(self) -> bool:
        return bool(self.pool)

    def take_preempted(self) -> list[str]:
        """Requests whose blocks were taken back since the last call (only the paged policy)."""
        return []


class OrcaScheduler(Scheduler):
    """Orca's Algorithm 1: every iteration, any request not in flight may run, in arrival order."""

    def _candidates(self) -> list[Request]:
        return [r for r in self.pool.values() if r.state != RequestState.RUNNING]


class StaticScheduler(Scheduler):
    """Request-level batching (FasterTransformer-style), the baseline.

    A batch of up to max_num_seqs waiting requests is formed when the previous batch has fully
    finished; it then runs iteration after iteration until its last request is done. Nobody joins
    mid-way. Finished members stop computing (no padding) and are returned at once.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._members: set[str] = set()  # the current batch; empty when a new one may form

    def _candidates(self) -> list[Request]:
        self._members &= self.pool.keys()  # members that finished have left the pool
        if self._members:
            return [r for rid, r in self.pool.items() if rid in self._members and r.state != RequestState.RUNNING]
        return [r for r in self.pool.values() if r.state == RequestState.INITIATION]

    def schedule(self) -> ScheduledBatch | None:
        batch = super().schedule()  # calls _candidates, which prunes _members first
        if batch is not None and not self._members:
            self._members = {r.request_id for r in batch.requests}
        return batch


def running_first(candidates: list[Request]) -> list[Request]:
    """Decoding requests, then prompts already partly computed, then new prompts; stable.
    Three buckets in one pass rather than a sort: with thousands of requests waiting (a
    simulated 10,000-request trace, a loaded server) the sort was the scheduler's largest cost."""
    decoding: list[Request] = []
    partial: list[Request] = []
    new: list[Request] = []
    initiation = RequestState.INITIATION
    for r in candidates:
        if r.num_computed_tokens == 0 or r.state == initiation:
            new.append(r)
        elif r.num_tokens - r.num_computed_tokens == 1:
            decoding.append(r)
        else:
            partial.append(r)
    return decoding + partial + new

