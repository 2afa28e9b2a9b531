import pytest

from orcinus.core.kv_cache import KVCacheManager, OutOfBlocks


def test_allocate_grows_tables_and_free_returns_every_block():
    kv = KVCacheManager(num_blocks=6, block_size=4)
    assert kv.n_slots == 24
    assert len(kv.allocate("a", 5)) == 2
    assert len(kv.allocate("a", 8)) == 2  # already covered
    assert len(kv.allocate("a", 9)) == 3
    kv.allocate("b", 12)
    assert kv.num_free_blocks == 0 and kv.usage() == 1.0
    assert set(kv.block_table("a")).isdisjoint(kv.block_table("b"))
    with pytest.raises(OutOfBlocks):
        kv.allocate("c", 1)
    assert not kv.holds("c")
    kv.free("a")
    kv.free("a")  # twice is harmless
    kv.free("b")
    assert kv.all_free()


def test_can_allocate_counts_only_the_extra_blocks():
    kv = KVCacheManager(num_blocks=3, block_size=2)
    kv.allocate("a", 4)
    assert kv.can_allocate("a", 6) and not kv.can_allocate("b", 3)


def test_most_recently_freed_blocks_are_reused_first():
    """LIFO reuse: a steady load keeps reusing the same few blocks instead of touching (and
    making resident) the whole pool."""
    kv = KVCacheManager(num_blocks=8, block_size=4)
    first = list(kv.allocate("a", 8))
    kv.allocate("b", 4)
    kv.free("a")
    assert kv.allocate("c", 8) == first  # a's blocks, in the same order
    touched = set()
    for i in range(20):  # one request at a time: only the first blocks are ever used
        touched |= set(kv.allocate(f"r{i}", 4))
        kv.free(f"r{i}")
    assert len(touched) == 1
