"""Engine side of the contract: turns the scheduler's decision into a `BatchMessage`, sending a
request in full only the first time, then just its newest token and blocks added since.

It remembers which requests the workers hold (and how many of each one's blocks they know), and
which ids they must drop with the next message."""
from __future__ import annotations

from orcinus.core.kv_cache import KVCacheManager
from orcinus.core.scheduler import ScheduledBatch
from orcinus.executor.messages import BatchMessage, CachedRequestData, NewRequestData, RequestData, SamplingSettings


class MessageBuilder:
    def __init__(self, kv_cache: KVCacheManager) -> None:
        self.kv_cache = kv_cache
        self._known_blocks: dict[str, int] = {}  # request id -> how many of its blocks workers hold
        self._known_tokens: dict[str, int] = {}  # request id -> how many of its tokens workers hold
        self._parked: set[str] = set()  # preempted: workers may keep its generator until it returns
        self._drops: list[str] = []
        self._preempted: list[str] = []

    def preempted(self, request_ids: list[str]) -> None:
        """The scheduler took these requests' blocks back: workers drop them with the next message
        and get them again in full (to recompute) when they are rescheduled."""
        for rid in request_ids:
            if self._known_blocks.pop(rid, None) is not None:
                self._known_tokens.pop(rid, None)
                self._preempted.append(rid)
                self._parked.add(rid)

    def build(self, batch: ScheduledBatch) -> BatchMessage:
        """Rows in the scheduler's order."""
        entries: list[RequestData] = []
        for req, n in zip(batch.requests, batch.num_new_tokens):
            rid = req.request_id
            table = self.kv_cache.block_table(rid)
            samples = req.samples_after(n)
            if req.num_computed_tokens + n > req.num_tokens or n < 1:
                raise AssertionError(f"{rid}: {n} new tokens after {req.num_computed_tokens} of {req.num_tokens}")
            known = self._known_blocks.get(rid)
            if known is None:
                settings = SamplingSettings.from_params(req.sampling_params, req.eos_token_ids)
                entries.append(NewRequestData(rid, list(req.prompt_token_ids), settings, list(table),
                                              list(req.output_token_ids), req.num_computed_tokens, n, samples,
                                              max(1, len(req.prompt_logprobs))))
                self._parked.discard(rid)
            else:
                grown = req.num_tokens - self._known_tokens[rid]
                if grown not in (0, 1):
                    raise AssertionError(f"{rid}: {grown} tokens appended since its last iteration")
                new_token = req.output_token_ids[-1] if grown else None
                entries.append(CachedRequestData(rid, new_token, list(table[known:]), n, samples))
            self._known_blocks[rid] = len(table)
            self._known_tokens[rid] = req.num_tokens
        drops, self._drops = self._drops, []
        preempted, self._preempted = self._preempted, []
        return BatchMessage(batch.batch_id, entries, drops, preempted)

    @staticmethod
    def retry(batch_id: int, entries: list[RequestData]) -> BatchMessage:
        """A message re-running some rows of a failed batch (the workers rolled that batch back)."""
        return BatchMessage(batch_id, list(entries))

    def forget(self, request_id: str) -> None:
        """The request finished or was aborted: workers drop its state with the next message."""
        self._known_tokens.pop(request_id, None)
        if request_id in self._preempted:  # not yet told: dropping is enough
            self._preempted.remove(request_id)
        known = self._known_blocks.pop(request_id, None) is not None
        if known or request_id in self._parked:
            self._parked.discard(request_id)
            self._drops.append(request_id)

    def drops_only(self) -> BatchMessage:
        drops, self._drops = self._drops, []
        return BatchMessage(-1, [], drops)

    def requeue_drops(self, request_ids: list[str]) -> None:
        self._drops[:0] = request_ids

    @property
    def pending_drops(self) -> list[str]:
        return list(self._drops)
