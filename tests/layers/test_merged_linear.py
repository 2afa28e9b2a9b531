"""The merged column-parallel linear: each checkpoint part lands in its own slice, per rank."""
from __future__ import annotations

import pytest
import torch

from orcinus.distributed.parallel_state import set_tensor_parallel
from orcinus.layers.linear import MergedColumnParallelLinear
from orcinus.models.loader import FullTensor


@pytest.fixture
def tp_rank():
    def use(rank: int, size: int) -> None:
        set_tensor_parallel(rank, size, None)
    yield use
    set_tensor_parallel(0, 1, None)


@pytest.mark.parametrize("rank", [0, 1])
def test_each_rank_holds_its_shard_of_every_part(tp_rank, rank):
    tp_rank(rank, 2)
    q, k, v = (torch.randn(n, 4) for n in (8, 4, 4))
    bq, bk, bv = (torch.randn(n) for n in (8, 4, 4))
    # k/v replicated-style explicit range (the second KV row pair) next to an even split of q
    layer = MergedColumnParallelLinear(4, [(8, None), (4, (2, 2)), (4, (2, 2))], bias=True)
    for part, (w, b) in enumerate(((q, bq), (k, bk), (v, bv))):
        layer.weight.weight_loader(layer.weight, FullTensor(w), part)
        layer.bias.weight_loader(layer.bias, FullTensor(b), part)
    x = torch.randn(3, 4)
    yq, yk, yv = layer.split(layer(x))
    rows = slice(rank * 4, rank * 4 + 4)
    torch.testing.assert_close(yq, x @ q[rows].T + bq[rows])
    torch.testing.assert_close(yk, x @ k[2:4].T + bk[2:4])
    torch.testing.assert_close(yv, x @ v[2:4].T + bv[2:4])


def test_wrong_part_shape_is_refused(tp_rank):
    tp_rank(0, 1)
    layer = MergedColumnParallelLinear(4, [(6, None), (6, None)], bias=False)
    with pytest.raises(ValueError, match="expected"):
        layer.weight.weight_loader(layer.weight, FullTensor(torch.randn(5, 4)), 1)
