"""Reference-counted KV blocks with a cache of full blocks keyed by their content.

A block is *free* when no request references it. A free block that holds a full, hashed block of
tokens stays findable by its hash until the pool needs the space: free blocks without content are
handed out first (most recently freed first, so a hot block is reused while still in a CPU or GPU
cache), then cached blocks are evicted least recently used first.

A block's hash covers its tokens *and* its parent's hash, so equal hashes mean equal prefixes:
a hit on block i is only looked for after hits on blocks 0..i-1.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence

BlockHash = bytes

_ROOT = b"orcinus-prefix-root"


def hash_block(parent: BlockHash | None, token_ids: Sequence[int]) -> BlockHash:
    """sha256 of (parent hash, token ids): collisions would silently mix two users' KV, so no
    64-bit Python hash here."""
    h = hashlib.sha256(parent if parent is not None else _ROOT)
    h.update(len(token_ids).to_bytes(4, "little"))
    h.update(b"".join(t.to_bytes(8, "little", signed=True) for t in token_ids))
    return h.digest()


def hash_prefix_blocks(token_ids: Sequence[int], block_size: int, num_blocks: int,
                       start: int = 0, parent: BlockHash | None = None) -> list[BlockHash]:
    """Chained hashes of full blocks start..num_blocks-1 (parent: hash of block start-1)."""
    out: list[BlockHash] = []
    for i in range(start, num_blocks):
        parent = hash_block(parent, token_ids[i * block_size:(i + 1) * block_size])
        out.append(parent)
    return out


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self.ref_count = [0] * num_blocks
        self.block_hash: list[BlockHash | None] = [None] * num_blocks
        self._by_hash: dict[BlockHash, int] = {}
        # free, no content: a stack, popped from the end (block 0 first at start-up)
        self._free_plain: list[int] = list(reversed(range(num_blocks)))
        # free, cached content: least recently used first
        self._free_cached: OrderedDict[int, None] = OrderedDict()

    # ------------------------------------------------------------------ counts
    @property
    def num_free(self) -> int:
        """Blocks a request could take now (cached but unreferenced blocks count: they evict)."""
        return len(self._free_plain) + len(self._free_cached)

    def free_blocks(self) -> list[int]:
        """Every block no request references (plain and cached alike), for invariant checks."""
        return self._free_plain + list(self._free_cached)

    @property
    def num_cached(self) -> int:
        return len(self._by_hash)

    # ------------------------------------------------------------------ taking and releasing
    def take(self) -> int:
        if self._free_plain:
            block = self._free_plain.pop()
        elif self._free_cached:
            block, _ = self._free_cached.popitem(last=False)
            self._forget(block)
        else:
            raise RuntimeError("no free KV block")  # callers check num_free first
        self.ref_count[block] = 1
        return block

    def share(self, block: int) -> None:
        """One more request references a block (a prefix-cache hit)."""
        if self.ref_count[block] == 0:
            del self._free_cached[block]  # only cached blocks are ever shared
        self.ref_count[block] += 1

    def release(self, block: int) -> None:
        rc = self.ref_count[block]
        if rc <= 0:
            raise RuntimeError(f"KV block {block} released more often than taken")
        self.ref_count[block] = rc - 1
        if rc == 1:
            if self.block_hash[block] is not None:
                self._free_cached[block] = None  # most recently used end
            else:
                self._free_plain.append(block)

    # ------------------------------------------------------------------ the content cache
    def lookup(self, block_hash: BlockHash) -> int | None:
        return self._by_hash.get(block_hash)

    def register(self, block: int, block_hash: BlockHash) -> None:
        """Make a referenced, fully written block findable. If another block already holds the same
        content (two requests computed it at once), this one stays anonymous."""
        if self.block_hash[block] is not None or block_hash in self._by_hash:
            return
        self.block_hash[block] = block_hash
        self._by_hash[block_hash] = block

    def forget(self, block: int) -> None:
        """Drop a block's content from the cache (its KV may be invalid)."""
        if self.block_hash[block] is None:
            return
        self._forget(block)
        if self.ref_count[block] == 0:
            del self._free_cached[block]
            self._free_plain.append(block)

    def _forget(self, block: int) -> None:
        h = self.block_hash[block]
        self.block_hash[block] = None
        if h is not None and self._by_hash.get(h) == block:
            del self._by_hash[h]

    def reset_cache(self) -> None:
        """Forget every cached block that no request references."""
        for block in list(self._free_cached):
            self.forget(block)
