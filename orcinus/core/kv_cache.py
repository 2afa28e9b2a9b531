"""Bookkeeping of the KV block pool: which blocks each request holds.

The tensors themselves live with the model runner; this class only hands out block ids. One
block holds `block_size` slots; one slot holds one token's keys and values for every layer.

Free blocks are a stack: the most recently freed are handed out first. Under a steady load the
same few blocks (still resident, still in the CPU's caches) are reused, instead of cycling
through the whole pool and making every page of it resident.
"""
from __future__ import annotations


class OutOfBlocks(RuntimeError):
    pass


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # top of the stack: block 0
        self._tables: dict[str, list[int]] = {}

    @property
    def n_slots(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

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
        return self.extra_blocks_needed(request_id, num_tokens) <= len(self._free)

    def allocate(self, request_id: str, num_tokens: int) -> list[int]:
        """Grow the request's block table so that it covers `num_tokens` slots."""
        extra = self.extra_blocks_needed(request_id, num_tokens)
        if extra > len(self._free):
            raise OutOfBlocks(f"{request_id} needs {extra} more blocks, {len(self._free)} are free")
        table = self._tables.setdefault(request_id, [])
        for _ in range(extra):
            table.append(self._free.pop())
        return table

    def block_table(self, request_id: str) -> list[int]:
        return self._tables[request_id]

    def holds(self, request_id: str) -> bool:
        return request_id in self._tables

    def free(self, request_id: str) -> None:
        """Return a request's blocks to the pool; freeing twice is harmless."""
        table = self._tables.pop(request_id, None)
        if table:
            self._free.extend(reversed(table))  # the table's first block ends on top

    def all_free(self) -> bool:
        return len(self._free) == self.num_blocks and not self._tables
