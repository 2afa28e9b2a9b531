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
        self._drops: list[str] = []

    def build(self, batch: ScheduledBatch) -> BatchMessage:
        """Rows in the scheduler's order."""
        entries: list[RequestData] = []
        for req, n in zip(batch.requests, batch.num_new_tokens):
            rid = req.request_id
            table = self.kv_cache.block_table(rid)
            known = self._known_blocks.get(rid)
            if known is None:
                if n != req.num_tokens:
                    raise AssertionError(f"{rid}: a new request computes all its {req.num_tokens} tokens, not {n}")
                settings = SamplingSettings.from_params(req.sampling_params, req.eos_token_ids)
                entries.append(NewRequestData(rid, list(req.prompt_token_ids), settings, list(table),
                                              list(req.output_token_ids)))
            else:
                if n != 1:
                    raise AssertionError(f"{rid}: a running request computes one token per iteration, not {n}")
                entries.append(CachedRequestData(rid, req.output_token_ids[-1], list(table[known:])))
            self._known_blocks[rid] = len(table)
        drops, self._drops = self._drops, []
        return BatchMessage(batch.batch_id, entries, drops)

    @staticmethod
    def retry(batch_id: int, entries: list[RequestData]) -> BatchMessage:
        """A message re-running some rows of a failed batch (the workers rolled that batch back)."""
        return BatchMessage(batch_id, list(entries))

    def forget(self, request_id: str) -> None:
        """The request finished or was aborted: workers drop its state with the next message."""
        if self._known_blocks.pop(request_id, None) is not None:
            self._drops.append(request_id)

    def drops_only(self) -> BatchMessage:
        drops, self._drops = self._drops, []
        return BatchMessage(-1, [], drops)

    def requeue_drops(self, request_ids: list[str]) -> None:
        self._drops[:0] = request_ids

    @property
    def pending_drops(self) -> list[str]:
        return list(self._drops)
