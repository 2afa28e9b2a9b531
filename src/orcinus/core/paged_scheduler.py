"""The `paged` policy (vLLM's): KV blocks are allocated as tokens are produced, not reserved.

Orca admits a request only if its worst case (prompt + max_tokens) fits, so the pool fills with
reservations that mostly never hold a token. Here a request is admitted when its prompt's blocks
fit (plus a small watermark left free for the requests already running); each iteration then
gives a running request the block its next token needs. When none is free, the most recently
admitted request that is not in flight is preempted: its blocks are freed and it waits again
with everything it generated so far, to be recomputed (prompt + generated tokens in one prefill,
whose last position samples the next token) when memory allows. Its output, its sampling state
and what was streamed are untouched, so the caller sees no difference.

A request in a batch that is in flight (n_workers > 1) is never preempted: its blocks are in use.
"""
from __future__ import annotations

import itertools

from orcinus.core.scheduler import Scheduler, ScheduledBatch, running_first
from orcinus.request import Request, RequestState

# Fraction of the pool kept free at admission so that running requests can grow a while
# before someone must be preempted (vLLM's default watermark is 1%).
WATERMARK = 0.01


class PagedScheduler(Scheduler):
    def __init__(self, *args, watermark: float = WATERMARK, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        n = self.kv_cache.num_blocks
        self.watermark_blocks = max(1, int(n * watermark)) if n > 1 else 0
        self._admitted: dict[str, int] = {}  # request id -> admission number (holds blocks)
        self._admissions = itertools.count()
        self._preempted_now: set[str] = set()
        self._preempted_log: list[str] = []
        self.num_preemptions = 0

    def _candidates(self) -> list[Request]:
        # Always running first: a waiting request that cannot be admitted stops admission (FCFS),
        # and must not stop the requests already running from taking their next step.
        return running_first([r for r in self.pool.values() if r.state != RequestState.RUNNING])

    def schedule(self) -> ScheduledBatch | None:
        self._preempted_now.clear()
        return super().schedule()

    # ------------------------------------------------------------------ blocks
    def _reserve(self, req: Request, left: int | None, batch: list[Request]) -> int | None:
        rid = req.request_id
        kv = self.kv_cache
        if rid in self._preempted_now:
            return 0  # preempted a moment ago to make room for someone in this batch
        if not kv.holds(rid):
            # Admission: the blocks of the whole prompt (for a preempted request: prompt + generated
            # tokens, all to be recomputed), reusing cached prefix blocks; keep a watermark free
            # unless nobody else holds memory (a request that fits alone must always get in).
            hit = self._cached_prefix(req)
            spare = self.watermark_blocks if self._admitted else 0
            if not kv.can_admit(hit, req.num_tokens, spare):
                return None
            kv.admit(rid, hit, req.num_tokens, req.num_prompt_tokens)
            req.num_computed_tokens = hit.num_tokens(kv.block_size)
            self._admitted[rid] = next(self._admissions)
            n = self._chunk(req, left)
        else:
            n = self._chunk(req, left)
            need = req.num_computed_tokens + n
            while not kv.can_allocate(rid, need):
                victim = self._victim(req, batch)
                self._preempt(victim)
                if victim is req:
                    return 0
            kv.allocate(rid, need)
        kv.cache_full_blocks(rid, req.all_token_ids, req.num_computed_tokens + n)
        return n

    @staticmethod
    def _chunk(req: Request, left: int | None) -> int:
        n = req.num_tokens - req.num_computed_tokens
        return n if left is None else min(n, left)

    def _victim(self, req: Request, batch: list[Request]) -> Request:
        """The most recently admitted request holding blocks that is neither in flight nor already
        in this batch; `req` itself qualifies, so there always is one."""
        chosen = None
        batch_ids = {r.request_id for r in batch}
        best = -1
        for rid, seq in self._admitted.items():
            other = self.pool.get(rid)
            if other is None or other.state == RequestState.RUNNING or rid in batch_ids:
                continue
            if seq > best:
                best, chosen = seq, other
        return chosen if chosen is not None else req

    def _preempt(self, req: Request) -> None:
        """Free the request's blocks; it waits again with its generated tokens, to be recomputed."""
        self.kv_cache.free(req.request_id)
        self._admitted.pop(req.request_id, None)
        req.num_computed_tokens = 0
        req.state = RequestState.INITIATION
        self._preempted_now.add(req.request_id)
        self._preempted_log.append(req.request_id)
        self.num_preemptions += 1

    def take_preempted(self) -> list[str]:
        out, self._preempted_log = self._preempted_log, []
        return out

    def _release(self, req: Request) -> None:
        self._admitted.pop(req.request_id, None)
        super()._release(req)
