"""Property tests of the KV block allocator with prefix caching: after any interleaving of
add / grow / cache / abort / finish / preempt / fail, every block's reference count equals the
number of tables that hold it, a free block is in exactly one free list, a cached hash names a
block with that hash, and once every request is gone every block is back in the pool."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from orcinus.core.kv_cache import KVCacheManager

BLOCK = 4
NUM_BLOCKS = 12

prompts = st.lists(st.integers(0, 2), min_size=1, max_size=20)  # tiny vocabulary: many shared prefixes
ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), prompts),
        st.tuples(st.just("grow"), st.integers(0, 7), st.integers(1, 6)),
        st.tuples(st.sampled_from(["abort", "finish", "preempt", "fail"]), st.integers(0, 7)),
    ),
    max_size=60,
)


def check_invariants(kv: KVCacheManager, tokens: dict[str, list[int]], forgotten: set[int] = frozenset()) -> None:
    pool = kv.pool
    refs = [0] * kv.num_blocks
    for rid in tokens:
        table = kv.block_table(rid)
        assert len(table) == len(set(table)), "a request holds a block twice"
        for b in table:
            refs[b] += 1
    assert refs == pool.ref_count
    plain, cached = set(pool._free_plain), set(pool._free_cached)
    assert len(plain) == len(pool._free_plain) and not plain & cached
    free = {b for b in range(kv.num_blocks) if refs[b] == 0}
    assert plain | cached == free, "a free block is lost, or a used block is free"
    # a shared block (two owners) can only be a cached, full block; unless a failed batch made the
    # cache forget it while another request still held it (that one keeps it, nobody new finds it)
    for b in range(kv.num_blocks):
        if refs[b] > 1 and b not in forgotten:
            assert pool.block_hash[b] is not None
    for h, b in pool._by_hash.items():
        assert pool.block_hash[b] == h
    assert all(pool.block_hash[b] is not None for b in cached)
    assert kv.num_free_blocks + sum(1 for r in refs if r) == kv.num_blocks


@settings(max_examples=150, deadline=None)
@given(ops)
def test_any_interleaving_keeps_the_pool_consistent(operations):
    kv = KVCacheManager(NUM_BLOCKS, BLOCK, enable_prefix_caching=True)
    tokens: dict[str, list[int]] = {}  # live requests: all their token ids
    computed: dict[str, int] = {}
    forgotten: set[int] = set()  # blocks whose content a failure made the cache forget
    next_id = 0
    for op in operations:
        live = sorted(tokens)
        if op[0] == "add":
            hit = kv.cached_prefix(op[1])
            if kv.can_admit(hit, len(op[1])):
                rid = f"r{next_id}"
                next_id += 1
                kv.admit(rid, hit, len(op[1]), len(op[1]))
                tokens[rid], computed[rid] = list(op[1]), len(hit.blocks) * BLOCK
                kv.cache_full_blocks(rid, tokens[rid], len(op[1]))
                computed[rid] = len(op[1])
        elif op[0] == "grow" and live:
            rid = live[op[1] % len(live)]
            new = tokens[rid] + [op[2] % 3] * op[2]
            if kv.can_allocate(rid, len(new)):
                kv.allocate(rid, len(new))
                tokens[rid] = new
                kv.cache_full_blocks(rid, new, len(new))
        elif live:
            rid = live[op[1] % len(live)]
            if op[0] == "fail":
                forgotten.update(kv.block_table(rid))
                kv.forget_blocks(rid)
            kv.free(rid)  # finish, abort and preempt all give the blocks back
            del tokens[rid]
        check_invariants(kv, tokens, forgotten)
        # no two live requests disagree about the content of a shared block
        owner: dict[int, tuple[int, ...]] = {}
        for rid, toks in tokens.items():
            for i, b in enumerate(kv.block_table(rid)):
                if (i + 1) * BLOCK <= len(toks):
                    content = tuple(toks[i * BLOCK:(i + 1) * BLOCK])
                    assert owner.setdefault(b, content) == content
    for rid in list(tokens):
        kv.free(rid)
    assert kv.all_free()
    kv.reset_prefix_cache()
    assert kv.pool.num_cached == 0 and len(kv.pool._free_plain) == NUM_BLOCKS
