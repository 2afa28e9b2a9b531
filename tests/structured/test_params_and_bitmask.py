"""The spec's validation and cache key, and the bitmask's application to logits against a
plain reference (bit t of word t // 32)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from orcinus.structured.bitmask import TokenBitmask, allowed_tokens, apply_logit_bias_, apply_token_bitmask_
from orcinus.structured.params import GrammarError, StructuredOutputsParams


def test_exactly_one_kind_and_canonical_key() -> None:
    for bad in [{}, {"regex": "a", "choice": ["b"]}, {"choice": []}, {"choice": ["", "x"]}, {"json": "{bad"},
                {"json": [1]}, {"structural_tag": "x"}]:
        with pytest.raises(GrammarError):
            StructuredOutputsParams.from_dict(bad)
    with pytest.raises(GrammarError, match="unsupported field"):
        StructuredOutputsParams.from_dict({"regex": "a", "disable_fallback": True})
    a = StructuredOutputsParams(json={"b": 1, "a": {"y": 2, "x": 1}})
    b = StructuredOutputsParams(json='{"a": {"x": 1, "y": 2}, "b": 1}')
    assert a.key() == b.key()
    assert a.key() != StructuredOutputsParams(json=a.json, disable_any_whitespace=True).key()


def _reference_allowed(bits: np.ndarray, vocab: int) -> np.ndarray:
    out = np.zeros((bits.shape[0], vocab), dtype=bool)
    for r in range(bits.shape[0]):
        for t in range(min(vocab, bits.shape[1] * 32)):
            out[r, t] = (int(bits[r, t // 32]) >> (t % 32)) & 1
    return out


@pytest.mark.parametrize("vocab", [70, 96, 130])  # bitmask shorter than, equal to, longer than the logits
def test_bitmask_matches_reference(vocab: int) -> None:
    rng = np.random.default_rng(0)
    bits = rng.integers(-2**31, 2**31, size=(3, 3), dtype=np.int64).astype(np.int32)
    bits[1] = -1  # an unconstrained row
    expect = _reference_allowed(bits, vocab)
    assert torch.equal(allowed_tokens(torch.from_numpy(bits), vocab), torch.from_numpy(expect))
    logits = torch.randn(3, vocab)
    out = apply_token_bitmask_(logits.clone(), torch.from_numpy(bits))
    want = logits.clone()
    want[~torch.from_numpy(expect)] = float("-inf")
    if vocab > 96:
        want[1, 96:] = logits[1, 96:]  # a -1 row is left alone, whatever its width
    assert torch.equal(out, want)


def test_rows_for_and_select() -> None:
    bm = TokenBitmask(["a", "c"], np.array([[1], [2]], dtype=np.int32))
    rows = bm.rows_for(["a", "b", "c"])
    assert rows.tolist() == [[1], [-1], [2]]
    assert bm.rows_for(["b"]) is None
    assert bm.select(["c"]).request_ids == ["c"] and bm.select(["b"]) is None


def test_logit_bias() -> None:
    logits = torch.zeros(2, 5)
    apply_logit_bias_(logits, [((1, 2.0), (4, -3.0)), ()])
    assert logits.tolist() == [[0, 2, 0, 0, -3], [0, 0, 0, 0, 0]]
