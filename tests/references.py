"""Independent references computed from transformers' own model: log-probs at every generated
position and at every prompt position, and greedy decoding with OpenAI/vLLM-style logit adjustments written out plainly."""
from __future__ import annotations

from typing import Callable

import pytest
import torch


@torch.no_grad()
def reference_logprobs(hf_model, prompt: list[int], generated: list[int]) -> torch.Tensor:
    """[len(generated), V]: transformers' log-softmax for each generated position, from one
    forward pass over prompt + generated (the last generated token needs no logits)."""
    seq = torch.tensor([prompt + generated[:-1]])
    logits = hf_model(seq).logits[0, len(prompt) - 1:].float()
    return torch.log_softmax(logits, dim=-1)


Adjust = Callable[[torch.Tensor, list[int], list[int]], torch.Tensor]


@torch.no_grad()
def hf_generate_greedy(hf_model, prompt: list[int], max_new: int) -> list[int]:
    """transformers' own `generate`, greedy, exactly `max_new` tokens (EOS ignored)."""
    out = hf_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                            max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def capture_logits(engine) -> list[torch.Tensor]:
    """Record the logits of every forward pass of an engine's (single-process) model runner."""
    captured: list[torch.Tensor] = []
    runner = engine.executor.driver_worker.runner
    original = runner.forward_logits

    def wrapped(inp):
        out = original(inp)
        captured.append(out.detach().cpu())
        return out

    runner.forward_logits = wrapped
    return captured


@torch.no_grad()
def reference_greedy(hf_model, prompt: list[int], max_new: int, adjust: Adjust | None = None,
                     stop_ids: tuple[int, ...] = ()) -> list[int]:
    """Greedy decoding one token at a time over transformers' logits; `adjust(logits, prompt,
    output)` edits the logits of each step first. Stops after emitting a token in stop_ids."""
    out: list[int] = []
    while len(out) < max_new:
        logits = hf_model(torch.tensor([prompt + out])).logits[0, -1].float().clone()
        if adjust is not None:
            logits = adjust(logits, prompt, out)
        tok = int(logits.argmax())
        out.append(tok)
        if tok in stop_ids:
            break
    return out


def repetition_penalty(p: float) -> Adjust:
    """CTRL / transformers / vLLM: every token seen in prompt or output has its logit divided by p
    when positive, multiplied by p when negative."""
    def adjust(logits, prompt, out):
        seen = torch.tensor(sorted(set(prompt + out)), dtype=torch.long)
        vals = logits[seen]
        logits[seen] = torch.where(vals > 0, vals / p, vals * p)
        return logits
    return adjust


def frequency_presence_penalty(frequency: float, presence: float) -> Adjust:
    """OpenAI: minus frequency * count and minus presence once, per token generated so far
    (the prompt does not count)."""
    def adjust(logits, prompt, out):
        for tok in set(out):
            logits[tok] -= frequency * out.count(tok) + presence
        return logits
    return adjust


def ban_until(ids: tuple[int, ...], n: int) -> Adjust:
    """min_tokens: the given ids cannot be chosen before n tokens exist."""
    def adjust(logits, prompt, out):
        if len(out) < n:
            logits[list(ids)] = float("-inf")
        return logits
    return adjust


@torch.no_grad()
def hf_prompt_logprobs(hf_model, prompt: list[int]) -> torch.Tensor:
    """[len(prompt) - 1, V]: row i is the distribution of prompt token i + 1."""
    return torch.log_softmax(hf_model(torch.tensor([prompt])).logits[0, :-1].float(), dim=-1)


def check_prompt_logprobs(out, hf_model, prompt: list[int], k: int, tol: float = 1e-4) -> None:
    ref = hf_prompt_logprobs(hf_model, prompt)
    entries = out.prompt_logprobs
    assert entries is not None and len(entries) == len(prompt)
    assert entries[0] is None
    for i in range(1, len(prompt)):
        tok, row, entry = prompt[i], ref[i - 1], entries[i]
        assert entry[tok].logprob == pytest.approx(float(row[tok]), abs=tol), i
        assert entry[tok].rank == int((row > row[tok]).sum()) + 1, i
        best = torch.topk(row, k)
        alternatives = {t for t, lp in entry.items() if t != tok or (lp.rank is not None and lp.rank <= k)}
        assert alternatives == set(best.indices.tolist()), i
        for rank, (t, v) in enumerate(zip(best.indices.tolist(), best.values.tolist()), 1):
            assert entry[t].logprob == pytest.approx(v, abs=tol), (i, t)
            assert entry[t].rank == rank, (i, t)
