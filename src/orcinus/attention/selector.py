"""Which attention backend an engine uses: the name the user gave, or for `auto` the fastest
correct one measured for the device (see docs/benchmarks.md, "Speed"):

- CUDA: the fused Triton kernel when triton imports, else the batched PyTorch backend.
- CPU: the paged backend (decodes in one C kernel call per layer, prompts per request over the
  pool's blocks): on one layer of the 64-request benchmark batch it measured 3.9 ms of CPU on an
  Intel Xeon against 7.0 ms for its own PyTorch path (no compiler), 8.1 ms for the reference
  backend and 22.5 ms for the batched backend (padded slot gather + masked SDPA)
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


def backend_class(name: str) -> type[AttentionBackend]:
    """The class of a named backend (not `auto`), imported only when asked for."""
    if name == "triton":
        from orcinus.attention.triton_paged import TritonPagedAttention
        return TritonPagedAttention
    if name == "paged":
        from orcinus.attention.paged_cpu import PagedCpuAttention
        return PagedCpuAttention
    if name == "batched":
        from orcinus.attention.batched import BatchedAttention
        return BatchedAttention
    if name == "reference":
        from orcinus.attention.reference import ReferenceAttention
        return ReferenceAttention
    raise ValueError(f"attention_backend={name!r} is unknown; choose one of {BACKEND_NAMES}")


def make_backend(name: str, device: torch.device) -> AttentionBackend:
    if name not in BACKEND_NAMES:
        raise ValueError(f"attention_backend={name!r} is unknown; choose one of {BACKEND_NAMES}")
    if name == "auto":
        name = auto_backend_name(device)
    return backend_class(name)()  # triton without the package: ImportError with the install hint
