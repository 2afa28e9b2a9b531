"""The Triton kernel at the shapes real models run (head_dim 64 and 128, blocks of 16 and 32
tokens, 1, 4 and 8 query heads per KV head) in float32, bfloat16 and float16, on mixed batches of
prefill chunks and decodes, with sliding windows and contexts over many blocks: the `tl.dot` path
the GPU runs, which the small cases of attention_cases.py do not reach.

The oracle is the reference backend in float32 on the same (rounded) inputs: the kernel
accumulates in float32, so its output must be that, rounded once to the input dtype."""
from __future__ import annotations

import numpy as np
import torch

from attention_cases import Case, make_inputs
from orcinus.attention.backend import AttentionBackend
from orcinus.attention.reference import ReferenceAttention

# (case, dtype). Sizes chosen for the interpreter's speed (it runs each program in Python): a few
# requests each, but every axis of the real shapes covered somewhere.
REAL_SHAPE_CASES = [
    # Llama-2-7B-like heads (MHA, head_dim 128) in bfloat16: decodes over 38 and 19 blocks, a prompt
    # chunk of 40 tokens (three tiles of BLOCK_M 16) after 260 tokens of context
    (Case("mha-d128-b16-long", [1, 40, 1], [600, 300, 300], 4, 4, 128, 16), torch.bfloat16),
    # 4 query heads per KV head, head_dim 128, bfloat16, blocks of 32, a fresh prompt among decodes
    (Case("gqa4-d128-b32-mixed", [1, 1, 33, 1], [257, 31, 33, 96], 8, 2, 128, 32), torch.bfloat16),
    # Llama-3-8B's GQA of 8 query heads per KV head, head_dim 128, float16
    (Case("gqa8-d128-b16-mixed", [1, 17, 1], [333, 50, 16], 8, 1, 128, 16), torch.float16),
    # head_dim 64 (SmolLM2, GPT-2 sizes), sliding window shorter than the context: the walk starts
    # at the window's first block
    (Case("gqa4-d64-b32-window", [1, 24, 1], [700, 200, 90], 8, 2, 64, 32, sliding_window=100), torch.bfloat16),
    (Case("mha-d64-b16-window-f32", [1, 20, 1, 1], [300, 120, 17, 64], 4, 4, 64, 16, sliding_window=48),
     torch.float32),
    # a decode-only batch (what a CUDA graph replays: tiles of one token) in bfloat16
    (Case("gqa8-d64-b16-decode", [1] * 6, [1, 16, 17, 100, 250, 513], 8, 1, 64, 16), torch.bfloat16),
]

# Output tolerance: one unit in the last place of the dtype at magnitude 1 (the inputs are
# standard normal, so outputs are weighted means of such values: mostly below 1 in magnitude).
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}


def _run(backend: AttentionBackend, case: Case, tensors):
    layout = tensors[0]
    q, k, v, kc, vc = (t.clone() for t in tensors[1:])
    meta = backend.build(layout, lambda a: torch.from_numpy(np.ascontiguousarray(a)))
    out = backend.forward(q, k, v, kc, vc, meta, case.head_dim ** -0.5, case.sliding_window)
    return out, kc, vc


def assert_matches_float32_reference(backend: AttentionBackend, case: Case, dtype: torch.dtype) -> float:
    """Returns the largest output difference (for the log)."""
    layout, *tensors = make_inputs(case)
    rounded = [t.to(dtype) for t in tensors]
    want, want_k, want_v = _run(ReferenceAttention(), case, [layout, *(t.float() for t in rounded)])
    got, got_k, got_v = _run(backend, case, [layout, *rounded])
    assert got.dtype == dtype and got.shape == want.shape, case.name
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol, msg=lambda m: f"{case.name} {dtype}: {m}")
    # the new keys and values are copied into the pool as they are
    assert torch.equal(got_k.float(), want_k) and torch.equal(got_v.float(), want_v), f"{case.name}: KV writes differ"
    return float((got.float() - want).abs().max())
