"""Micro-benchmark of the attention backends on one layer of a decode-heavy mixed batch.

`python -m orcinus.bench.attention_micro [--requests 64] [--backends batched,reference] [--prompts]`

Default shapes are the default model's (SmolLM2-135M: 9 query heads, 3 KV heads, head dim 64,
blocks of 16) with 64 requests whose contexts are spread like the benchmark trace's (prompts
U(32,256) plus up to 128 generated tokens), two of them prefill chunks. Blocks are scattered over
the pool as after many iterations. Reports process CPU time per layer (it moves less than wall
time with other processes' load); `auto` is chosen from these numbers (orcinus/attention/selector.py).
`paged-torch` is the paged backend without its C kernels (the path kept where no compiler works).
`--prompts`: whole prompts instead (contexts U(32,256), every one a prefill chunk, as in the
iteration that admits a batch of newcomers), for the prefill kernel.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from orcinus.attention.metadata import BatchLayout
from orcinus.attention.selector import make_backend


def make_batch(requests: int, heads: int, kv_heads: int, head_dim: int, block_size: int, seed: int = 0,
               prompts: bool = False):
    rng = np.random.default_rng(seed)
    if prompts:  # every request a whole prompt
        seq = rng.integers(32, 256, requests)
        q_lens = seq.astype(np.int64)
    else:
        seq = rng.integers(32, 256, requests) + rng.integers(0, 128, requests)
        q_lens = np.ones(requests, dtype=np.int64)
        q_lens[:2] = np.minimum(seq[:2], 64)  # two prefill chunks ride along, as in a mixed iteration
    nb = -(-seq // block_size)
    pool = int(nb.sum()) * 2
    perm = rng.permutation(pool)
    table = np.zeros((requests, int(nb.max())), dtype=np.int64)
    used = 0
    for i, n in enumerate(nb):
        table[i, :n] = perm[used:used + n]
        used += n
    req = np.repeat(np.arange(requests), q_lens)
    cu = np.concatenate([[0], np.cumsum(q_lens)])
    pos = np.arange(int(q_lens.sum())) - cu[:-1][req] + (seq - q_lens)[req]
    slots = table[req, pos // block_size] * block_size + pos % block_size
    layout = BatchLayout(q_lens, seq.astype(np.int64), table, slots, block_size)
    g = torch.Generator().manual_seed(seed)
    t = int(q_lens.sum())
    shape = (pool, block_size, kv_heads, head_dim)
    tensors = [torch.randn(t, heads, head_dim, generator=g), torch.randn(t, kv_heads, head_dim, generator=g),
               torch.randn(t, kv_heads, head_dim, generator=g), torch.randn(shape, generator=g),
               torch.randn(shape, generator=g)]
    return layout, tensors


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--backends", default="batched,reference")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--prompts", action="store_true", help="whole prompts instead of a decode-heavy batch")
    args = p.parse_args(argv)
    layout, (q, k, v, kc, vc) = make_batch(args.requests, 9, 3, 64, 16, prompts=args.prompts)
    up = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    names = [b.strip() for b in args.backends.split(",") if b.strip()]
    backends = {n: make_backend(n.removesuffix("-torch"), torch.device("cpu")) for n in names}
    metas = {n: b.build(layout, up) for n, b in backends.items()}
    if "paged-torch" in metas:
        metas["paged-torch"].native = None  # every request through the per-request SDPA loop
    cpu = {n: 0.0 for n in names}
    for _ in range(args.repeats):  # interleaved, so drifting load hits every backend alike
        for n, b in backends.items():
            t0 = time.process_time()
            b.forward(q, k, v, kc, vc, metas[n], 0.125)
            cpu[n] += time.process_time() - t0
    kind = "whole prompts" if args.prompts else "decodes and two prompt chunks"
    print(f"{args.requests} requests ({kind}, {int(layout.query_lens.sum())} query tokens), "
          f"torch threads={torch.get_num_threads()}")
    for n in names:
        print(f"{n}: {1e3 * cpu[n] / args.repeats:.2f} ms CPU per layer")


if __name__ == "__main__":
    main()
