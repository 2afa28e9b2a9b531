"""Mixed batches for checking attention backends against the reference backend.

Each case scatters its requests over a shuffled block pool (so block tables are not contiguous),
mixes prefill chunks (with and without earlier context) and decodes, and uses context lengths
that end mid-block. The reference backend is the oracle."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from orcinus.attention.backend import AttentionBackend
from orcinus.attention.metadata import BatchLayout
from orcinus.attention.reference import ReferenceAttention


@dataclass
class Case:
    name: str
    query_lens: list[int]
    seq_lens: list[int]
    num_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    sliding_window: int | None = None


CASES = [
    Case("mixed-gqa", [5, 1, 1, 3, 1], [5, 17, 2, 20, 33], 6, 2, 16, 4),
    Case("decode-only-mha", [1, 1, 1], [1, 9, 16], 4, 4, 8, 8),
    Case("prefill-only-window", [7, 12], [7, 30], 4, 1, 16, 4, sliding_window=5),
    Case("mixed-window-odd-block", [1, 9, 1, 2], [14, 9, 3, 11], 3, 3, 8, 3, sliding_window=4),
    Case("long-prefill-chunk", [20, 1], [37, 40], 2, 1, 16, 16),
    Case("fresh-prompts-inside-window", [6, 12, 1], [6, 12, 20], 4, 2, 16, 4, sliding_window=16),
]


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's (and so the C kernels') thread count set to n inside the block, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def make_inputs(case: Case, seed: int = 0, consecutive: bool = False):
    """consecutive: hand out blocks in order (each request's run is consecutive) instead of shuffled."""
    rng = np.random.default_rng(seed)
    bs = case.block_size
    q_lens = np.asarray(case.query_lens, dtype=np.int64)
    seq_lens = np.asarray(case.seq_lens, dtype=np.int64)
    blocks_needed = -(-seq_lens // bs)
    num_blocks = int(blocks_needed.sum()) + 3
    perm = np.arange(num_blocks) if consecutive else rng.permutation(num_blocks)
    table = np.zeros((len(q_lens), int(blocks_needed.max())), dtype=np.int64)
    used = 0
    for i, n in enumerate(blocks_needed):
        table[i, :n] = perm[used:used + n]
        used += n
    req = np.repeat(np.arange(len(q_lens)), q_lens)
    cu = np.concatenate([[0], np.cumsum(q_lens)])
    positions = np.arange(int(q_lens.sum())) - cu[:-1][req] + (seq_lens - q_lens)[req]
    slots = table[req, positions // bs] * bs + positions % bs
    layout = BatchLayout(q_lens, seq_lens, table, slots, bs)
    g = torch.Generator().manual_seed(seed)
    t = int(q_lens.sum())
    shape = (num_blocks, bs, case.num_kv_heads, case.head_dim)
    k_cache, v_cache = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    q = torch.randn(t, case.num_heads, case.head_dim, generator=g)
    k = torch.randn(t, case.num_kv_heads, case.head_dim, generator=g)
    v = torch.randn(t, case.num_kv_heads, case.head_dim, generator=g)
    return layout, q, k, v, k_cache, v_cache


def run_backend(backend: AttentionBackend, case: Case, seed: int = 0, consecutive: bool = False):
    """(output, k_cache, v_cache) after one forward of `backend` on the case."""
    layout, q, k, v, k_cache, v_cache = make_inputs(case, seed, consecutive)
    meta = backend.build(layout, lambda a: torch.from_numpy(np.ascontiguousarray(a)))
    out = backend.forward(q, k, v, k_cache, v_cache, meta, case.head_dim ** -0.5, case.sliding_window)
    return out, k_cache, v_cache


def assert_matches_reference(backend: AttentionBackend, case: Case, seed: int = 0, atol: float = 1e-5,
                             consecutive: bool = False) -> None:
    want, want_k, want_v = run_backend(ReferenceAttention(), case, seed, consecutive)
    got, got_k, got_v = run_backend(backend, case, seed, consecutive)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=atol, rtol=1e-4, msg=lambda m: f"{case.name}: {m}")
    assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v), f"{case.name}: KV writes differ"
