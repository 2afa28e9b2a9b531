"""float32 CPU weights of the layer linears are stored transposed after loading (faster GEMMs at
decode sizes); shapes, values and outputs stay those of the checkpoint, and bfloat16 keeps its layout."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from orcinus.layers.linear import (ColumnParallelLinear, MergedColumnParallelLinear, ParallelLMHead,
                                   RowParallelLinear, lay_out_for_cpu)


def _model(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    with torch.device("cpu"):
        m = nn.ModuleDict({"col": ColumnParallelLinear(16, 24, bias=True), "row": RowParallelLinear(24, 16, bias=False),
                           "merged": MergedColumnParallelLinear(16, [(8, None), (8, None)], bias=False),
                           "head": ParallelLMHead(40, 16)})
    for p in m.parameters():
        p.data = torch.randn(p.shape).to(dtype)
    return m


@pytest.mark.parametrize("dtype,moves", [(torch.float32, True), (torch.bfloat16, False)])
def test_layer_weights_move_to_column_major_in_float32_only(dtype, moves):
    m = _model(dtype)
    x = torch.randn(5, 16).to(dtype)
    before = {name: p.detach().clone() for name, p in m.named_parameters()}
    want = m["row"](m["col"](x)), m["merged"](x)
    assert lay_out_for_cpu(m) == (3 if moves else 0)
    for name, p in m.named_parameters():
        assert torch.equal(p, before[name]) and p.shape == before[name].shape
    for key in ("col", "row", "merged"):
        w = m[key].weight
        assert w.is_contiguous() != moves and (w.t().is_contiguous() == moves or not moves)
    assert m["head"].weight.is_contiguous()  # the LM head (and a tied embedding) keep rows
    got = m["row"](m["col"](x)), m["merged"](x)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
