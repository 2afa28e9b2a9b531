"""The two MLPs of decoder-only transformers: gated (Llama: down(act(gate) * up)) and plain
(GPT-2, OPT: down(act(up))). The up (and gate) projections are column-parallel, the down
projection row-parallel (one all-reduce). Long CPU batches run in row chunks (row_chunks.py)."""
from __future__ import annotations

import torch
from torch import nn

from orcinus.distributed.parallel_state import even_split
from orcinus.layers.activations import get_activation
from orcinus.layers.linear import ColumnParallelLinear, MergedColumnParallelLinear, RowParallelLinear
from orcinus.layers.row_chunks import in_row_chunks


class GatedMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, act: str, bias: bool = False) -> None:
        super().__init__()
        even_split(intermediate_size, "the MLP's intermediate_size")
        # gate and up in one GEMM (checkpoint parts 0 and 1)
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [(intermediate_size, None)] * 2, bias)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias)
        self.act = get_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return in_row_chunks(self._rows, x)

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj.split(self.gate_up_proj(x))
        return self.down_proj(self.act(gate) * up)


class MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, act: str, bias: bool = True) -> None:
        super().__init__()
        even_split(intermediate_size, "the MLP's intermediate_size")
        self.up_proj = ColumnParallelLinear(hidden_size, intermediate_size, bias)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias)
        self.act = get_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return in_row_chunks(self._rows, x)

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.up_proj(x)))
