"""Bookkeeping of the KV block pool: which blocks each request holds.

The tensors themselves live with the model runner; this class only hands out block ids. One
block holds `block_size` slots; one slot holds one token's keys and values for every layer.

Blocks are reference counted so that requests can share the blocks of a common prefix (prefix
caching, n > 1 siblings). Freed blocks are reused most recently freed first; with prefix caching
a freed full block keeps its content findable until the pool needs it (see block_pool.py).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from orcinus.core.block_pool import BlockHash, BlockPool, hash_block, hash_prefix_blocks


class OutOfBlocks(RuntimeError):
    pass


@dataclass
class PrefixHit:
    """The longest cached prefix of a token sequence: its blocks and their chained hashes."""

    blocks: list[int] = field(default_factory=list)
    hashes: list[BlockHash] = field(default_factory=list)

    def num_tokens(self, block_size: int) -> int:
        return len(self.blocks) * block_size


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False) -> None:
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks)
        self._tables: dict[str, list[int]] = {}
        self._hashes: dict[str, list[BlockHash]] = {}  # chained hashes of each request's full blocks
        # prefix-cache counters, in tokens (as vLLM's prefix_cache_queries / _hits)
        self.prefix_queries = 0
        self.prefix_hits = 0

    @property
    def n_slots(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.pool.num_free

    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_reserved_slots(self) -> int:
        return self.num_used_blocks * self.block_size

    def extra_blocks_needed(self, request_id: str, num_tokens: int) -> int:
        have = len(self._tables.get(request_id, ()))
        return max(0, self.blocks_needed(num_tokens) - have)

    def can_allocate(self, request_id: str, num_tokens: int) -> bool:
        return self.extra_blocks_needed(request_id, num_tokens) <= self.pool.num_free

    def allocate(self, request_id: str, num_tokens: int) -> list[int]:
        """Grow the request's block table so that it covers `num_tokens` slots."""
        extra = self.extra_blocks_needed(request_id, num_tokens)
        if extra > self.pool.num_free:
            raise OutOfBlocks(f"{request_id} needs {extra} more blocks, {self.pool.num_free} are free")
        table = self._tables.setdefault(request_id, [])
        for _ in range(extra):
            table.append(self.pool.take())
        return table

    def block_table(self, request_id: str) -> list[int]:
        return self._tables[request_id]

    def holds(self, request_id: str) -> bool:
        return request_id in self._tables

    def free(self, request_id: str) -> None:
        """Return a request's blocks to the pool; freeing twice is harmless."""
        table = self._tables.pop(request_id, None)
        self._hashes.pop(request_id, None)
        if table:
            # Last block first: the tail of a sequence is the least likely to be shared, so with
            # prefix caching it should be the first evicted.
            for block in reversed(table):
                self.pool.release(block)

    def all_free(self) -> bool:
        return self.pool.num_free == self.num_blocks and not self._tables

    # ------------------------------------------------------------------ prefix caching
    def cached_prefix(self, token_ids: Sequence[int]) -> PrefixHit:
        """Blocks of the longest cached prefix of `token_ids`, leaving at least one token to compute
        (the model must run on the last token to produce the next one)."""
        hit = PrefixHit()
        if not self.enable_prefix_caching:
            return hit
        parent: BlockHash | None = None
        bs = self.block_size
        for i in range((len(token_ids) - 1) // bs):
            parent = hash_block(parent, token_ids[i * bs:(i + 1) * bs])
            block = self.pool.lookup(parent)
            if block is None:
                break
            hit.blocks.append(block)
            hit.hashes.append(parent)
        return hit

    def can_admit(self, hit: PrefixHit, num_tokens: int, spare_blocks: int = 0) -> bool:
        """Could a request without blocks get `num_tokens` slots (reusing `hit`) and still leave
        `spare_blocks` free?"""
        new = max(0, self.blocks_needed(num_tokens) - len(hit.blocks))
        # a hit on a free cached block takes it out of the free pool
        revived = sum(1 for b in hit.blocks if self.pool.ref_count[b] == 0)
        return new + revived + spare_blocks <= self.pool.num_free

    def admit(self, request_id: str, hit: PrefixHit, num_tokens: int, num_prompt_tokens: int) -> list[int]:
        """Give a request without blocks the cached prefix `hit` plus fresh blocks up to
        `num_tokens` slots. Counts the query and the hit in prompt tokens."""
        if request_id in self._tables:
            raise RuntimeError(f"{request_id} already holds KV blocks")
        if not self.can_admit(hit, num_tokens):
            raise OutOfBlocks(f"{request_id} needs more blocks than are free")
        for block in hit.blocks:
            self.pool.share(block)
        self._tables[request_id] = list(hit.blocks)
        self._hashes[request_id] = list(hit.hashes)
        if self.enable_prefix_caching:
            self.prefix_queries += num_prompt_tokens
            self.prefix_hits += min(hit.num_tokens(self.block_size), num_prompt_tokens)
        return self.allocate(request_id, num_tokens)

    def cache_full_blocks(self, request_id: str, token_ids: Sequence[int], num_tokens: int) -> None:
        """The first `num_tokens` of the request will be in its KV once its batch has run: make the
        full blocks among them findable by later requests. Called when the batch is scheduled, so
        a request scheduled after it (same batch or a later one) may share them; the KV is written
        before anyone reads it because a batch writes every token's KV before attending."""
        if not self.enable_prefix_caching:
            return
        table = self._tables.get(request_id)
        if table is None:
            return
        hashes = self._hashes.setdefault(request_id, [])
        full = min(num_tokens // self.block_size, len(table))
        if full <= len(hashes):
            return
        parent = hashes[-1] if hashes else None
        for block, h in zip(table[len(hashes):full],
                            hash_prefix_blocks(token_ids, self.block_size, full, len(hashes), parent)):
            self.pool.register(block, h)
            hashes.append(h)

    def forget_blocks(self, request_id: str) -> None:
        """A batch failed: the request's blocks may hold garbage, so nobody may reuse them."""
        for block in self._tables.get(request_id, ()):
            self.pool.forget(block)
        self._hashes.pop(request_id, None)

    def reset_prefix_cache(self) -> None:
        self.pool.reset_cache()

    def real_token_slots(self, num_computed: dict[str, int]) -> int:
        """Slots that hold a real token's KV, each shared block counted once.

        `num_computed`: request id -> tokens whose KV is written."""
        bs = self.block_size
        fill: dict[int, int] = {}
        for rid, n in num_computed.items():
            for i, block in enumerate(self._tables.get(rid, ())):
                f = min(bs, max(0, n - i * bs))
                if f > fill.get(block, 0):
                    fill[block] = f
        return sum(fill.values())
