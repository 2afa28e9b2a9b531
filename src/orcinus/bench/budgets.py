"""Token budgets of the benchmarks' "unchunked" orcinus backends (orca, static, paged).

Such a backend should run every prompt whole, as the paper's Orca does, but the budget must still
be finite: on CUDA the model runner sizes its persistent upload buffers by it and the worker
profiles activations at it before sizing the KV pool, so the old "no budget" (1 << 30 tokens)
asked for ~32 GiB of pinned host memory and a profiling pass no GPU holds. A budget of at least
the trace's longest prompt lets every prompt run whole in some iteration; a prompt that does not
fit in what an iteration has left next to others is cut at the budget (the scheduler chunks any
prompt longer than what is left), which at these budgets happens to few prompts of a trace.

CPU: 2048 (the CPU's own default of 512 chunks more; throughput measured equal with 1024, 2048
and no budget). CUDA: 8192, enough to batch several 1024-token prompts per iteration while the
activations of one iteration stay small next to the KV pool (to be chosen by measurement on a GPU).
"""
from __future__ import annotations

from typing import Sequence

import torch

UNCHUNKED_BUDGET_CPU = 2048
UNCHUNKED_BUDGET_CUDA = 8192


def unchunked_budget(device: torch.device, prompt_lens: Sequence[int] = ()) -> int:
    """The per-iteration token budget of an unchunked backend on `device`: the device's default, or
    the longest prompt of the trace when that is longer (so that every prompt can run whole)."""
    default = UNCHUNKED_BUDGET_CUDA if device.type == "cuda" else UNCHUNKED_BUDGET_CPU
    return max(default, max(prompt_lens, default=0))
