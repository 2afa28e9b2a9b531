"""Logit changes that come before any sampling stage: the grammar's allowed-token mask and
OpenAI's logit_bias. Kept apart from the sampler's stages (penalties, top-k/p, ...) because
they change which tokens exist at all for a row, so log-probs are reported after them."""
from __future__ import annotations

from typing import Sequence

import torch

from orcinus.structured.bitmask import apply_logit_bias_, apply_token_bitmask_


def apply_logit_constraints(logits: torch.Tensor, bitmask: torch.Tensor | None,
                            logit_bias: Sequence[Sequence[tuple[int, float]]], copy: bool) -> torch.Tensor:
    """logits [rows, V] float32 with the mask and biases applied; a copy when `copy` and any
    row has either, else the input itself."""
    has_bias = any(logit_bias)
    if bitmask is None and not has_bias:
        return logits
    out = logits.clone() if copy else logits
    if has_bias:
        apply_logit_bias_(out, logit_bias)
    if bitmask is not None:
        apply_token_bitmask_(out, bitmask)
    return out
