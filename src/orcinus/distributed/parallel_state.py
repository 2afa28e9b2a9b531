"""This process's place in the tensor-parallel group, set once by the worker before the model is
built. With one rank every collective is a no-op, so the layers have one code path."""
from __future__ import annotations

from orcinus.errors import ConfigError

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
        raise ConfigError(f"{what} ({total}) is not divisible by {setting}={_TP.size}; choose a {setting} "
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


@dataclass
class PipelineStage:
    """Which contiguous run of layers this process holds, and its neighbours' global ranks."""

    stage: int = 0
    num_stages: int = 1
    prev_rank: int | None = None  # same tensor-parallel rank, previous stage
    next_rank: int | None = None

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.num_stages - 1

    def layer_range(self, num_layers: int) -> tuple[int, int]:
        """An even split (the paper's default); earlier stages take one more when it is uneven."""
        if num_layers < self.num_stages:
            raise ValueError(f"pipeline_parallel_size={self.num_stages} exceeds the model's {num_layers} layers; "
                             "choose at most one stage per layer")
        base, extra = divmod(num_layers, self.num_stages)
        start = self.stage * base + min(self.stage, extra)
        return start, start + base + (1 if self.stage < extra else 0)


_PP = PipelineStage()


def pipeline_stage() -> PipelineStage:
    return _PP


def set_pipeline_stage(stage: PipelineStage) -> None:
    global _PP
    _PP = stage


def send_to_next_stage(hidden: torch.Tensor | None, device: torch.device) -> None:
    """Status first (0: hidden states follow, 1: this batch failed upstream), then the states."""
    status = torch.full((1,), 0 if hidden is not None else 1, dtype=torch.int64, device=device)
    dist.send(status, _PP.next_rank)
    if hidden is not None:
        dist.send(hidden.contiguous(), _PP.next_rank)


def recv_from_prev_stage(num_tokens: int, hidden_size: int, dtype: torch.dtype,
                         device: torch.device) -> torch.Tensor | None:
    """The previous stage's hidden states for this batch, or None when it failed there."""
    status = torch.empty(1, dtype=torch.int64, device=device)
    dist.recv(status, _PP.prev_rank)
    if int(status) != 0:
        return None
    hidden = torch.empty((num_tokens, hidden_size), dtype=dtype, device=device)
    dist.recv(hidden, _PP.prev_rank)
    return hidden
