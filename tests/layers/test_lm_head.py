"""The LM head: on CPU it computes logits in vocabulary slices; every slice must land in place."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from orcinus.layers.linear import ParallelLMHead, _VOCAB_SLICE


@pytest.mark.parametrize("rows", [1, 3, 4, 17, 64])
@pytest.mark.parametrize("vocab", [_VOCAB_SLICE - 5, 3 * _VOCAB_SLICE + 7])
def test_logits_equal_one_gemm(rows, vocab):
    torch.manual_seed(rows)
    head = ParallelLMHead(vocab, 48)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, 48))
    hidden = torch.randn(rows, 48)
    with torch.inference_mode():
        logits = head(hidden)
    assert logits.shape == (rows, vocab)
    torch.testing.assert_close(logits, F.linear(hidden, head.weight.detach()), rtol=1e-5, atol=1e-5)


def test_bfloat16_logits_follow_the_weight_dtype():
    head = ParallelLMHead(2 * _VOCAB_SLICE + 1, 32).to(torch.bfloat16)
    with torch.no_grad():
        head.weight.copy_(torch.randn(2 * _VOCAB_SLICE + 1, 32))
    hidden = torch.randn(8, 32, dtype=torch.bfloat16)
    with torch.inference_mode():
        logits = head(hidden)
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), F.linear(hidden, head.weight.detach()).float(), rtol=2e-2, atol=2e-2)
