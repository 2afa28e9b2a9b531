"""This process's place in the tensor-parallel group, set once by the worker before the model is
built. With one rank every collective is a no-op, so the layers have one code path."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class TensorParallelGroup:
    rank: int = 0
    size: int = 1
    group: object | None = None  # a torch.distributed ProcessGroup when size > 1


_TP = TensorParallelGroup()


def tensor_parallel() -> TensorParallelGroup:
    return _TP


def set_tensor_parallel(rank: int, size: int, group: object | None) -> None:
    global _TP
    _TP = TensorParallelGroup(rank, size, group)


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum over the ranks, in place (the row-parallel layers' partial results)."""
    if _TP.size > 1:
        dist.all_reduce(x, group=_TP.group)
    return x


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's shard along the last dimension (vocabulary-parallel logits)."""
    if _TP.size == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(_TP.size)]
    dist.all_gather(parts, x, group=_TP.group)
    return torch.cat(parts, dim=-1)


def even_split(total: int, what: str, setting: str = "tensor_parallel_size") -> int:
    """Per-rank share of `total`; refuses a split that is not exact."""
    if total % _TP.size:
        raise ValueError(f"{what} ({total}) is not divisible by {setting}={_TP.size}; choose a {setting} "
                         f"that divides it")
    return total // _TP.size


def kv_head_range(num_kv_heads: int) -> tuple[int, int]:
    """(first KV head, count) this rank holds: an even split, or one replicated head per group of
    ranks when there are fewer KV heads than ranks (each serves the query heads of its ranks)."""
    size, rank = _TP.size, _TP.rank
    if num_kv_heads >= size:
        per = even_split(num_kv_heads, "the number of key/value heads")
        return rank * per, per
    if size % num_kv_heads:
        raise ValueError(f"tensor_parallel_size={size} is neither a divisor nor a multiple of the model's "
                         f"{num_kv_heads} key/value heads; choose one that is")
    return rank * num_kv_heads // size, 1
