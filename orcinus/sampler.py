"""Batched token sampling: one call per iteration for every request in the batch.

Each row of the logits belongs to one request with its own SamplingParams. Rather than sampling
row by row, the sampler turns the per-request settings into per-row tensors and applies every
stage (penalties, min_tokens masking, temperature, top-k, top-p, min-p, sampling) to the whole
batch at once. A stage no row uses is skipped, so the common all-greedy batch costs one argmax
and one logsumexp.

Semantics follow vLLM:
  * penalties act on the raw logits before temperature;
  * a temperature below 1e-5 means greedy (argmax after penalties; top-k/p and min-p ignored);
  * reported log-probs come from the raw model distribution (log_softmax of the unmodified
    logits), not from the processed one;
  * a request with a seed draws its randomness from its own generator, so its tokens do not
    depend on what else is in the batch or on its row.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from orcinus.request import Request

# Exponential draws of exactly 0 would turn probs/q into inf (or nan for masked tokens).
_MIN_EXP_DRAW = 1e-20


@dataclass
class SamplerOutput:
    token_ids: list[int]  # one sampled token per row
    # log-prob of the sampled token under the raw distribution (log_softmax of the raw logits)
    logprobs: list[float]
    # per row: the top-k {token_id: logprob} of the raw distribution, highest first, when
    # sampling_params.logprobs is set (k = that number; 0 gives an empty dict), else None
    top_logprobs: list[dict[int, float] | None]


def token_counts(token_lists: list[list[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """[len(token_lists), vocab_size] int64 counts of each token id per row.

    Built with one bincount over flattened (row * V + token) indices rather than a Python loop
    over tokens. Ids outside [0, V) (e.g. from a tokenizer larger than the model's head) are
    dropped instead of crashing the whole batch.
    """
    n = len(token_lists)
    lengths = torch.tensor([len(t) for t in token_lists], dtype=torch.long)
    flat = torch.tensor(list(itertools.chain.from_iterable(token_lists)), dtype=torch.long)
    if flat.numel() == 0:
        return torch.zeros(n, vocab_size, dtype=torch.long, device=device)
    rows = torch.repeat_interleave(torch.arange(n), lengths)
    valid = (flat >= 0) & (flat < vocab_size)
    index = rows[valid] * vocab_size + flat[valid]
    counts = torch.bincount(index, minlength=n * vocab_size).view(n, vocab_size)
    return counts.to(device)


def apply_penalties(
    logits: torch.Tensor,
    prompt_mask: torch.Tensor,
    output_counts: torch.Tensor,
    repetition_penalty: torch.Tensor,
    frequency_penalty: torch.Tensor,
    presence_penalty: torch.Tensor,
) -> torch.Tensor:
    """Apply vLLM's three penalties in place to logits [n, V] and return them.

    prompt_mask: [n, V] bool, token occurs in the prompt; output_counts: [n, V] counts in the
    output so far; the penalties are [n] per-row values (1.0 / 0.0 where a row has none).
    """
    output_counts = output_counts.to(logits.dtype)
    in_output = output_counts > 0
    # Repetition: a seen token is made less likely whatever its sign, hence divide positives
    # and multiply negatives (CTRL's formulation, as vLLM and HF do).
    rep = repetition_penalty.unsqueeze(1).expand_as(logits)
    seen = prompt_mask | in_output
    scaled = torch.where(logits > 0, logits / rep, logits * rep)
    logits.copy_(torch.where(seen, scaled, logits))
    # OpenAI-style: frequency scales with the count, presence is a flat charge; output only.
    logits -= frequency_penalty.unsqueeze(1) * output_counts
    logits -= presence_penalty.unsqueeze(1) * in_output.to(logits.dtype)
    return logits


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None
) -> torch.Tensor:
    """Mask (set -inf) tokens outside each row's top-k and nucleus, in place; returns logits.

    top_k: [n] long, V or more where a row has it off; top_p: [n] float, 1.0 where off.
    """
    n, vocab = logits.shape
    if top_p is None:
        if top_k is None:
            return logits
        # Only top-k: a partial topk up to the largest k in use beats a full sort. Rows with
        # top-k off are excluded from that maximum and get a -inf threshold instead.
        active = top_k < vocab
        k = top_k.clamp(max=vocab)
        k_max = int(k[active].max())
        values = logits.topk(k_max, dim=-1).values
        thresh = values.gather(1, (k.clamp(max=k_max) - 1).unsqueeze(1))
        thresh = thresh.masked_fill(~active.unsqueeze(1), float("-inf"))
        return logits.masked_fill_(logits < thresh, float("-inf"))

    # Nucleus needs the full descending order; top-k rides along on the same sort.
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    positions = torch.arange(vocab, device=logits.device).unsqueeze(0)
    if top_k is not None:
        sorted_logits.masked_fill_(positions >= top_k.unsqueeze(1), float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    # Keep a token while the mass strictly before it is below p: the smallest prefix reaching
    # p. The first token always has 0 mass before it, so at least one token survives.
    mass_before = probs.cumsum(dim=-1) - probs
    # Rows with p = 1 must keep everything even if rounding pushes the cumsum past 1.
    p = torch.where(top_p >= 1.0, torch.full_like(top_p, 2.0), top_p)
    sorted_logits.masked_fill_(mass_before >= p.unsqueeze(1), float("-inf"))
    return logits.scatter_(1, order, sorted_logits)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask tokens whose probability is below min_p x the row's top probability, in place."""
    probs = logits.softmax(dim=-1)
    thresh = min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill_(probs < thresh, float("-inf"))


class Sampler:
    """Samples one token per row for a batch of requests with mixed SamplingParams."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        # One shared generator per device for unseeded rows; created lazily because the
        # device is only known when logits arrive.
        self._generators: dict[torch.device, torch.Generator] = {}

    def _shared_generator(self, device: torch.device) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device).manual_seed(self.seed)
            self._generators[device] = gen
        return gen

    # ---------------------------------------------------------------- logits processing

    def process_logits(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """Penalties and min_tokens masking applied to float32 logits [B, V].

        Returns the input itself (no copy) when no row needs either, else a new tensor; the
        caller's logits are never modified.
        """
        batch, vocab = logits.shape
        params = [r.sampling_params for r in requests]
        pen_rows = [
            i
            for i, p in enumerate(params)
            if p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0
        ]
        mask_rows: list[int] = []
        mask_ids: list[int] = []
        for i, req in enumerate(requests):
            p = params[i]
            if p.min_tokens and len(req.output_token_ids) < p.min_tokens:
                # Masked whether or not ignore_eos is set: min_tokens promises that many tokens
                # before any stop token could be chosen.
                ids = [t for t in itertools.chain(req.eos_token_ids, p.stop_token_ids or []) if 0 <= t < vocab]
                mask_rows.extend([i] * len(ids))
                mask_ids.extend(ids)
        if not pen_rows and not mask_rows:
            return logits

        out = logits.clone()
        device = logits.device
        if pen_rows:
            sub = [requests[i] for i in pen_rows]
            sub_params = [params[i] for i in pen_rows]
            output_counts = token_counts([r.output_token_ids for r in sub], vocab, device)
            # The prompt only matters for repetition penalty; skip counting it otherwise.
            if any(p.repetition_penalty != 1.0 for p in sub_params):
                prompt_mask = token_counts([r.prompt_token_ids for r in sub], vocab, device) > 0
            else:
                prompt_mask = torch.zeros(len(sub), vocab, dtype=torch.bool, device=device)

            def per_row(name: str) -> torch.Tensor:
                return torch.tensor([getattr(p, name) for p in sub_params], dtype=out.dtype, device=device)

            if len(pen_rows) == batch:
                apply_penalties(out, prompt_mask, output_counts, per_row("repetition_penalty"),
                                per_row("frequency_penalty"), per_row("presence_penalty"))
            else:
                idx = torch.tensor(pen_rows, dtype=torch.long, device=device)
                out[idx] = apply_penalties(out[idx], prompt_mask, output_counts, per_row("repetition_penalty"),
                                           per_row("frequency_penalty"), per_row("presence_penalty"))
        if mask_rows:
            out[torch.tensor(mask_rows, device=device), torch.tensor(mask_ids, device=device)] = float("-inf")
        return out

    # ---------------------------------------------------------------- sampling

    def _sample_random(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """Sample one token per row of logits [n, V] (all rows non-greedy); returns [n] long.

        logits must be a tensor the sampler owns: it is modified in place.
        """
        n, vocab = logits.shape
        device = logits.device
        params = [r.sampling_params for r in requests]

        temps = torch.tensor([p.temperature for p in params], dtype=logits.dtype, device=device)
        logits.div_(temps.unsqueeze(1))

        top_k = None
        if any(p.top_k > 0 and p.top_k < vocab for p in params):
            top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params], device=device)
        top_p = None
        if any(p.top_p < 1.0 for p in params):
            top_p = torch.tensor([p.top_p for p in params], dtype=logits.dtype, device=device)
        apply_top_k_top_p(logits, top_k, top_p)
        if any(p.min_p > 0.0 for p in params):
            min_p = torch.tensor([p.min_p for p in params], dtype=logits.dtype, device=device)
            apply_min_p(logits, min_p)

        probs = logits.softmax(dim=-1)
        # Exponential race: argmax(p_i / q_i) with q_i ~ Exp(1) picks token i with probability
        # p_i, and unlike torch.multinomial it lets each row take its noise from its own
        # generator, which is what makes seeded requests independent of the batch.
        q = torch.empty_like(probs)
        unseeded: list[int] = []
        for j, req in enumerate(requests):
            seed = req.sampling_params.seed
            if seed is None:
                unseeded.append(j)
                continue
            if req.generator is None:
                req.generator = torch.Generator(device=device).manual_seed(seed)
            q[j].exponential_(generator=req.generator)
        if len(unseeded) == n:
            q.exponential_(generator=self._shared_generator(device))
        elif unseeded:
            idx = torch.tensor(unseeded, dtype=torch.long, device=device)
            q[idx] = torch.empty(len(unseeded), vocab, dtype=q.dtype, device=device).exponential_(
                generator=self._shared_generator(device)
            )
        return probs.div_(q.clamp_min_(_MIN_EXP_DRAW)).argmax(dim=-1)

    def __call__(self, logits: torch.Tensor, requests: list[Request]) -> SamplerOutput:
        if logits.dim() != 2 or logits.shape[0] != len(requests):
            raise ValueError(f"logits must be [len(requests), V], got {tuple(logits.shape)} for {len(requests)} requests")
        batch, vocab = logits.shape
        device = logits.device
        raw = logits if logits.dtype == torch.float32 else logits.float()
        work = self.process_logits(raw, requests)

        greedy = [r.sampling_params.greedy for r in requests]
        if all(greedy):
            token_ids = work.argmax(dim=-1)
        else:
            rand_rows = [i for i, g in enumerate(greedy) if not g]
            rand_reqs = [requests[i] for i in rand_rows]
            if len(rand_rows) == batch:
                # _sample_random works in place; never touch the caller's tensor.
                token_ids = self._sample_random(work.clone() if work is logits else work, rand_reqs)
            else:
                token_ids = torch.empty(batch, dtype=torch.long, device=device)
                greedy_idx = torch.tensor([i for i, g in enumerate(greedy) if g], dtype=torch.long, device=device)
                rand_idx = torch.tensor(rand_rows, dtype=torch.long, device=device)
                if greedy_idx.numel():
                    token_ids[greedy_idx] = work[greedy_idx].argmax(dim=-1)
                # Advanced indexing copies, so the in-place stages are safe here.
                token_ids[rand_idx] = self._sample_random(work[rand_idx], rand_reqs)

        # Raw-distribution log-probs: logit - logsumexp avoids materialising a full log_softmax.
        lse = torch.logsumexp(raw, dim=-1)
        chosen = raw.gather(1, token_ids.unsqueeze(1)).squeeze(1) - lse

        top_logprobs: list[dict[int, float] | None] = [None] * batch
        lp_rows = [i for i, r in enumerate(requests) if r.sampling_params.logprobs is not None]
        if lp_rows:
            k_max = min(max(requests[i].sampling_params.logprobs or 0 for i in lp_rows), vocab)
            if k_max > 0:
                idx = torch.tensor(lp_rows, dtype=torch.long, device=device)
                # topk of raw logits equals topk of log_softmax: the shift is per row.
                vals, ids = raw[idx].topk(k_max, dim=-1)
                vals = (vals - lse[idx].unsqueeze(1)).tolist()
                ids = ids.tolist()
            for j, i in enumerate(lp_rows):
                k = min(requests[i].sampling_params.logprobs or 0, vocab)
                top_logprobs[i] = {ids[j][m]: vals[j][m] for m in range(k)} if k else {}

        return SamplerOutput(
            token_ids=token_ids.tolist(),
            logprobs=chosen.tolist(),
            top_logprobs=top_logprobs,
        )

