"""Which attention backend an engine uses: the name the user gave, or for `auto` the fastest
correct one measured for the device (see docs/benchmarks.md, "Speed"):

- CUDA: the fused Triton kernel when triton imports, else the batched PyTorch backend.
- CPU: the paged backend (per-request attention over the pool's blocks, views where consecutive):
  on one layer of the 64-request benchmark batch it measured 8.5 ms of CPU against 31.9 ms for
  the batched backend (padded slot gather + masked SDPA) and 9.4 ms for the reference backend
  (orcinus/bench/attention_micro.py; end-to-end numbers in docs/benchmarks.md, "Speed"). The Triton
  kernel runs on CPU only under its interpreter, for tests.

The reference backend is never picked by `auto`; it stays the oracle the others are tested against.
"""
from __future__ import annotations

import torch

from orcinus.attention.backend import AttentionBackend

BACKEND_NAMES = ("auto", "reference", "batched", "paged", "triton")


def auto_backend_name(device: torch.device) -> str:
    if device.type == "cuda":
        from orcinus.attention.triton_paged import AVAILABLE
        return "triton" if AVAILABLE else "batched"
    return "paged"


def make_backend(name: str, device: torch.device) -> AttentionBackend:
    if name not in BACKEND_NAMES:
        raise ValueError(f"attention_backend={name!r} is unknown; choose one of {BACKEND_NAMES}")
    if name == "auto":
        name = auto_backend_name(device)
    if name == "triton":
        from orcinus.attention.triton_paged import TritonPagedAttention
        return TritonPagedAttention()  # ImportError with the install hint when triton is missing
    if name == "paged":
        from orcinus.attention.paged_cpu import PagedCpuAttention
        return PagedCpuAttention()
    if name == "batched":
        from orcinus.attention.batched import BatchedAttention
        return BatchedAttention()
    from orcinus.attention.reference import ReferenceAttention
    return ReferenceAttention()
