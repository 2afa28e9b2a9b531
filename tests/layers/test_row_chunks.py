"""Long flat batches run through the MLPs in row chunks on CPU: same values, chunked only when long."""
from __future__ import annotations

import torch

from orcinus.layers.row_chunks import CPU_ROW_CHUNK, in_row_chunks


def test_long_batches_are_chunked_and_equal_to_one_call():
    weight = torch.randn(64, 48)
    calls: list[int] = []

    def mlp(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        return torch.relu(x @ weight.t()) @ weight

    x = torch.randn(2 * CPU_ROW_CHUNK + 37, 48)
    got = in_row_chunks(mlp, x)
    assert calls == [CPU_ROW_CHUNK, CPU_ROW_CHUNK, 37]
    torch.testing.assert_close(got, mlp(x), rtol=1e-5, atol=1e-5)


def test_short_batches_are_one_call():
    calls: list[int] = []
    x = torch.randn(2 * CPU_ROW_CHUNK - 1, 8)
    out = in_row_chunks(lambda rows: calls.append(rows.shape[0]) or rows * 2, x)
    assert calls == [x.shape[0]] and torch.equal(out, x * 2)
