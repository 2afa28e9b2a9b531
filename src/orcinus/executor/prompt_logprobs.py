"""Log-probs at the prompt's positions (SamplingParams.prompt_logprobs), on the last pipeline stage.

Sampling needs logits only at each row's last token; a request asking for prompt log-probs also
needs them at every prompt position its iteration computes, since position p's distribution
scores prompt token p + 1. Only those requests' positions go through the LM head here, in slices
of rows so that a long prompt never holds a [prompt, vocabulary] float32 tensor; requests that do
not ask cost nothing. Values are of the raw model distribution (log_softmax of the logits).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from orcinus.executor.messages import PromptLogprobsChunk

# Rows of logits at a time: [256, 49152] float32 is 48 MiB, and the LM head GEMM stays efficient.
_ROWS_PER_SLICE = 256


@dataclass
class PromptSpan:
    """One request's positions in this iteration that score prompt tokens."""

    request_id: str
    flat_start: int  # index in the iteration's flat token tensor of position `first`
    first: int  # first such position in the sequence (it scores prompt token first + 1)
    targets: list[int]  # the prompt tokens scored: prompt[first + 1 : first + 1 + count]
    k: int  # top alternatives wanted


def prompt_spans(rows: Sequence, flat_starts: Sequence[int]) -> list[PromptSpan]:
    """The spans of the rows (worker requests) that want prompt log-probs this iteration."""
    spans = []
    for row, flat in zip(rows, flat_starts):
        lo, hi = row.prompt_logprob_positions()
        if hi > lo:
            spans.append(PromptSpan(row.request_id, flat + lo - row.num_computed_tokens, lo,
                                    row.prompt_token_ids[lo + 1:hi + 1], row.settings.prompt_logprobs or 0))
    return spans


def compute_prompt_logprobs(hidden: torch.Tensor, spans: list[PromptSpan],
                            compute_logits: Callable[[torch.Tensor], torch.Tensor]
                            ) -> dict[str, PromptLogprobsChunk]:
    """hidden: the last stage's output for every token of the iteration [T, H]."""
    if not spans:
        return {}
    device = hidden.device
    index = torch.cat([torch.arange(s.flat_start, s.flat_start + len(s.targets)) for s in spans]).to(device)
    targets = torch.tensor([t for s in spans for t in s.targets], dtype=torch.long, device=device)
    k_max = max(s.k for s in spans)
    own, ranks, top_vals, top_ids = [], [], [], []
    for lo in range(0, len(index), _ROWS_PER_SLICE):
        logits = compute_logits(hidden.index_select(0, index[lo:lo + _ROWS_PER_SLICE])).float()
        tgt = targets[lo:lo + _ROWS_PER_SLICE]
        lse = torch.logsumexp(logits, dim=-1)
        chosen = logits.gather(1, tgt.unsqueeze(1))
        own.append(chosen.squeeze(1) - lse)
        # rank 1 + how many tokens are strictly more likely (vLLM's definition)
        ranks.append((logits > chosen).sum(dim=-1) + 1)
        if k_max:
            vals, ids = logits.topk(min(k_max, logits.shape[1]), dim=-1)
            top_vals.append(vals - lse.unsqueeze(1))
            top_ids.append(ids)
    own_np = torch.cat(own).cpu().numpy()
    ranks_np = torch.cat(ranks).cpu().numpy().astype(np.int64)
    if k_max:
        vals_np = torch.cat(top_vals).cpu().numpy()
        ids_np = torch.cat(top_ids).cpu().numpy().astype(np.int64)
    else:
        vals_np = np.zeros((len(index), 0), dtype=np.float32)
        ids_np = np.zeros((len(index), 0), dtype=np.int64)
    out: dict[str, PromptLogprobsChunk] = {}
    at = 0
    for s in spans:
        m = len(s.targets)
        out[s.request_id] = PromptLogprobsChunk(
            s.first + 1, own_np[at:at + m].copy(), ranks_np[at:at + m].copy(),
            ids_np[at:at + m, :s.k].copy(), vals_np[at:at + m, :s.k].copy())
        at += m
    return out
