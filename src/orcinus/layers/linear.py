"""Tensor-parallel linear layers and embeddings (Megatron-style), each parameter with a weight
loader that reads only this rank's shard of the checkpoint tensor.

Column-parallel: each rank holds a slice of the output features (no communication). Row-parallel:
each rank holds a slice of the input features and the partial outputs are summed with one
all-reduce. With one rank they are plain linears and embeddings.
"""
from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from orcinus.distributed.parallel_state import all_gather_last_dim, all_reduce, even_split, tensor_parallel
from orcinus.layers import quantized_linear as quant


class CheckpointTensor(Protocol):
    """A checkpoint tensor not yet read: its full shape, and reads of all or part of it."""

    shape: tuple[int, ...]

    def full(self) -> torch.Tensor: ...

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor: ...


def _check_shape(param: nn.Parameter, loaded: CheckpointTensor, full_shape: tuple[int, ...]) -> None:
    if tuple(loaded.shape) != tuple(full_shape):
        raise ValueError(f"checkpoint tensor has shape {tuple(loaded.shape)}, expected {tuple(full_shape)}")


def _shard_loader(dim: int, start: int, length: int, full_shape: tuple[int, ...]):
    def load(param: nn.Parameter, loaded: CheckpointTensor) -> None:
        _check_shape(param, loaded, full_shape)
        if quant.is_gguf_tensor(loaded):  # kept in its GGUF blocks (layers/quantized_linear.py)
            return quant.load_shard(param, loaded, dim, start, length)
        part = loaded.narrow(dim, start, length) if loaded.shape[dim] != length else loaded.full()
        param.data = part.to(device=param.device, dtype=param.dtype).contiguous()
    return load


def _param(shape: tuple[int, ...], loader) -> nn.Parameter:
    p = nn.Parameter(torch.empty(shape), requires_grad=False)
    p.weight_loader = loader
    return p


class ColumnParallelLinear(nn.Module):
    """y = x W^T for this rank's output rows [start, start + length) of the full layer (an even
    split by default; replicated KV heads pass their own range)."""

    def __init__(self, in_features: int, out_features: int, bias: bool,
                 out_range: tuple[int, int] | None = None) -> None:
        super().__init__()
        if out_range is None:
            per = even_split(out_features, "an output dimension")
            out_range = (tensor_parallel().rank * per, per)
        start, length = out_range
        self.weight = _param((length, in_features), _shard_loader(0, start, length, (out_features, in_features)))
        self.bias = _param((length,), _shard_loader(0, start, length, (out_features,))) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quant.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """y = sum over ranks of x_r W_r^T, plus the bias once after the all-reduce."""

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        per = even_split(in_features, "an input dimension")
        start = tensor_parallel().rank * per
        self.weight = _param((out_features, per), _shard_loader(1, start, per, (out_features, in_features)))
        self.bias = _param((out_features,), _shard_loader(0, 0, out_features, (out_features,))) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = all_reduce(quant.linear(x, self.weight))
        return y + self.bias if self.bias is not None else y


def _vocab_shard(vocab_size: int) -> tuple[int, int]:
    """(first id, rows) of this rank's vocabulary shard; the last shard is padded to equal size."""
    tp = tensor_parallel()
    per = -(-vocab_size // tp.size)
    return tp.rank * per, per


def _vocab_loader(vocab_size: int, hidden: int):
    start, per = _vocab_shard(vocab_size)

    def load(param: nn.Parameter, loaded: CheckpointTensor) -> None:
        _check_shape(param, loaded, (vocab_size, hidden))
        if quant.is_gguf_tensor(loaded):
            return quant.load_vocab(param, loaded, start, per, vocab_size)
        real = max(0, min(per, vocab_size - start))
        part = loaded.full() if real == vocab_size else loaded.narrow(0, start, real)
        data = torch.zeros((per, hidden), dtype=param.dtype, device=param.device)
        data[:real] = part.to(device=param.device, dtype=param.dtype)
        param.data = data
    return load


class VocabParallelEmbedding(nn.Module):
    """Each rank embeds the ids in its vocabulary shard (zeros elsewhere); one all-reduce sums."""

    def __init__(self, vocab_size: int, hidden: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.start, per = _vocab_shard(vocab_size)
        self.weight = _param((per, hidden), _vocab_loader(vocab_size, hidden))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if tensor_parallel().size == 1:
            return quant.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = quant.embedding(local.masked_fill(outside, 0), self.weight)
        return all_reduce(out.masked_fill_(outside.unsqueeze(-1), 0.0))


class ParallelLMHead(nn.Module):
    """Logits for this rank's vocabulary shard, gathered into the full row on every rank."""

    def __init__(self, vocab_size: int, hidden: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.weight = _param(_vocab_shard(vocab_size)[1:] + (hidden,), _vocab_loader(vocab_size, hidden))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if quant.quantized(self.weight) is not None:
            logits = quant.linear(hidden, self.weight)
        elif hidden.device.type == "cpu" and hidden.dim() == 2 and hidden.shape[0] >= _SLICED_MIN_ROWS:
            logits = _vocab_sliced_linear(hidden, self.weight)
        else:
            logits = F.linear(hidden, self.weight)
        return all_gather_last_dim(logits)[..., :self.vocab_size]


# On CPU the LM head's GEMM (a [rows, vocab] output from a weight of vocab x hidden, 113 MB for the
# default model) ran at 50-67 GF/s on one core against ~90 for the layers' GEMMs. Computing it in
# slices of 1024 vocabulary rows keeps each slice's weight and output in cache: 15-33 % faster for
# 4 to 256 rows, with bit-identical logits (docs/benchmarks.md, "LM head"). One row gains nothing.
_VOCAB_SLICE = 1024
_SLICED_MIN_ROWS = 4


def _vocab_sliced_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    out = x.new_empty(x.shape[0], weight.shape[0])
    for start in range(0, weight.shape[0], _VOCAB_SLICE):
        stop = min(start + _VOCAB_SLICE, weight.shape[0])
        torch.mm(x, weight[start:stop].t(), out=out[:, start:stop])
    return out


class MergedColumnParallelLinear(nn.Module):
    """Several column-parallel linears over the same input (q/k/v, gate/up) stored as one weight,
    so the forward is one GEMM instead of several. Checkpoints keep the separate tensors: the
    loader takes a shard id and writes this rank's rows of that part into its slice of the merged
    weight (under tensor parallelism, each part is split on its own, then the slices concatenated).

    parts: (full output features, this rank's (start, length) or None for an even split) per part.
    `split(y)` cuts the merged output back into the parts (views, no copy)."""

    def __init__(self, in_features: int, parts: list[tuple[int, tuple[int, int] | None]], bias: bool) -> None:
        super().__init__()
        ranges = []
        for out_features, out_range in parts:
            if out_range is None:
                per = even_split(out_features, "an output dimension")
                out_range = (tensor_parallel().rank * per, per)
            ranges.append(out_range)
        self.sizes = [length for _, length in ranges]
        offsets = [sum(self.sizes[:i]) for i in range(len(parts))]
        total = sum(self.sizes)
        fulls = [out for out, _ in parts]
        self.weight = _param((total, in_features), _merged_loader(ranges, offsets, [(o, in_features) for o in fulls]))
        self.weight.shard_ids = tuple(range(len(parts)))
        self.bias = None
        if bias:
            self.bias = _param((total,), _merged_loader(ranges, offsets, [(o,) for o in fulls]))
            self.bias.shard_ids = tuple(range(len(parts)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quant.linear(x, self.weight, self.bias)

    def split(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return y.split(self.sizes, dim=-1)


def _merged_loader(ranges: list[tuple[int, int]], offsets: list[int], full_shapes: list[tuple[int, ...]]):
    def load(param: nn.Parameter, loaded: CheckpointTensor, shard_id: int) -> None:
        if not 0 <= shard_id < len(ranges):
            raise ValueError(f"shard id {shard_id} out of range for a merged linear of {len(ranges)} parts")
        _check_shape(param, loaded, full_shapes[shard_id])
        start, length = ranges[shard_id]
        if quant.is_gguf_tensor(loaded):
            return quant.load_merged_part(param, loaded, shard_id, start, length, offsets[shard_id])
        part = loaded.narrow(0, start, length) if loaded.shape[0] != length else loaded.full()
        param.data[offsets[shard_id]:offsets[shard_id] + length].copy_(part.to(param.dtype))
    return load


# Which GEMM layout a CPU runs fastest, measured per shape (docs/benchmarks.md, "Third
# round"): for float32 on an Intel Xeon the layers' GEMMs at decode sizes (4-64 rows) ran 15-70 %
# faster with the weight stored transposed ([in, out] contiguous, so MKL does not transpose it per
# call) when the weight was in cache, 2-9 % when every call read another layer's weight from memory
# (as in a model), and the same from 512 rows up; on an AMD EPYC the two were within 10 %.
# bfloat16 (AMX tiles) gained nothing consistent, so only float32 moves.
_CPU_COLUMN_MAJOR_DTYPES = (torch.float32,)


def lay_out_for_cpu(model: nn.Module) -> int:
    """Store every layer linear's float32 CPU weight transposed in memory (shape, values and
    names unchanged: the parameter becomes a [out, in] view of an [in, out] tensor). Returns how
    many weights moved. The LM head keeps its layout (its vocabulary slices run fastest
    row-major, and a tied embedding reads rows)."""
    moved = 0
    for module in model.modules():
        if not isinstance(module, (ColumnParallelLinear, RowParallelLinear, MergedColumnParallelLinear)):
            continue
        w = module.weight
        if w.device.type == "cpu" and w.dtype in _CPU_COLUMN_MAJOR_DTYPES and w.dim() == 2 and w.is_contiguous():
            w.data = w.data.t().contiguous().t()
            moved += 1
    return moved
