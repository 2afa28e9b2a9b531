"""Checkpoint tensors and how they reach a model's parameters.

A family maps each checkpoint tensor name to `Target`s (`CausalLM.checkpoint_targets`): which
parameter, which part of a merged parameter (q/k/v, gate/up), and a view that presents the tensor
as that parameter expects it (GPT-2 stores its linears transposed and q/k/v fused). Parameters
with a `weight_loader` (the tensor-parallel layers) read only their own shard through the view,
so a safetensors file is never read whole by a rank that holds a slice of it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from orcinus.layers.linear import CheckpointTensor


class FullTensor:
    """A checkpoint tensor already in memory (GGUF dequantised, or a .bin file)."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor
        self.shape = tuple(tensor.shape)

    def full(self) -> torch.Tensor:
        return self.tensor

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        return self.tensor.narrow(dim, start, length)


class Transposed:
    """A 2-D checkpoint tensor read as its transpose ([in, out] stored, [out, in] wanted)."""

    def __init__(self, inner: CheckpointTensor) -> None:
        self.inner = inner
        self.shape = tuple(reversed(inner.shape))

    def full(self) -> torch.Tensor:
        return self.inner.full().t()

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        return self.inner.narrow(1 - dim, start, length).t()


class Part:
    """Part `index` of `count` equal parts along dim 0 of a fused tensor (GPT-2's q, k, v)."""

    def __init__(self, inner: CheckpointTensor, index: int, count: int) -> None:
        self.inner = inner
        rows = inner.shape[0] // count
        self.offset = index * rows
        self.shape = (rows, *inner.shape[1:])

    def full(self) -> torch.Tensor:
        return self.inner.narrow(0, self.offset, self.shape[0])

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        if dim == 0:
            return self.inner.narrow(0, self.offset + start, length)
        return self.full().narrow(dim, start, length)


View = Callable[[CheckpointTensor], CheckpointTensor]


@dataclass(frozen=True)
class Target:
    """Where (part of) one checkpoint tensor goes."""

    param: str  # parameter name in the model
    shard: int | None = None  # part of a merged parameter (its weight loader's shard id)
    view: View | None = None  # how to read the checkpoint tensor for it


def load_checkpoint(model: nn.Module, targets: Callable[[str], list[Target]],
                    weights: Iterable[tuple[str, torch.Tensor | CheckpointTensor]]) -> None:
    """Fill the model's parameters from named checkpoint tensors; every parameter must be filled
    (tied ones through the parameter they share)."""
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    parts: dict[str, set[int]] = {}  # merged parameters: the parts read so far
    for name, tensor in weights:
        source = FullTensor(tensor) if isinstance(tensor, torch.Tensor) else tensor
        for t in targets(name):
            if t.param not in params:
                raise ValueError(f"checkpoint tensor {name!r} has no place in {type(model).__name__}")
            _load_one(name, params[t.param], t.view(source) if t.view else source, t.shard)
            if t.shard is None:
                loaded.add(t.param)
            else:
                parts.setdefault(t.param, set()).add(t.shard)
                if parts[t.param] >= set(getattr(params[t.param], "shard_ids", ())):
                    loaded.add(t.param)
    tied = {n for n, p in model.named_parameters() if n not in loaded and any(p is params[l] for l in loaded)}
    missing = set(params) - loaded - tied
    if missing:
        raise ValueError(f"checkpoint lacks weights for {sorted(missing)[:5]} ({len(missing)} in all)")


def _load_one(name: str, p: nn.Parameter, source: CheckpointTensor, shard: int | None) -> None:
    with torch.no_grad():
        loader = getattr(p, "weight_loader", None)
        if loader is not None:
            try:
                loader(p, source) if shard is None else loader(p, source, shard)
            except ValueError as exc:
                raise ValueError(f"checkpoint tensor {name!r}: {exc}") from None
            return
        if tuple(p.shape) != tuple(source.shape):
            raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(source.shape)}, expected {tuple(p.shape)}")
        # Adopt the loaded tensor when it already has the right dtype and device (no copy).
        p.data = source.full().to(device=p.device, dtype=p.dtype).contiguous()
