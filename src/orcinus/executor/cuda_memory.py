"""How big the KV pool may be on a CUDA device, and where each rank runs.

Sizing, after the model is loaded and before the pool exists:
1. free memory, from the driver (`mem_get_info`): what other processes, this process's CUDA
   context, the weights and any cached-but-unused blocks leave (the cache is emptied first);
2. the activations' peak, measured by running the largest iteration the settings allow
   (max_num_seqs rows and the whole, always finite, token budget) into a throwaway pool;
3. the CUDA graphs' memory, measured by running the largest increment-only batch the graphs
   capture (their private memory pool holds about one such forward's activations), reserved
   before the pool because the graphs are captured after it, when nothing else could give way.
The pool gets `gpu_memory_utilization` of the free memory less those two: the rest stays for the
allocator's fragmentation, cuBLAS and NCCL workspaces and the sampler's transient tensors.

`MemoryProbe` is the device interface the sizing reads, so that a test can run the real sizing
code on a CPU against a simulated card (tests/executor/test_cuda_memory.py).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from orcinus.config import ConfigError

logger = logging.getLogger(__name__)

# Kept above the measured decode peak for the graphs: each captured size adds its own small
# allocations (graph nodes, the output buffer of each size) on top of the largest one's.
GRAPH_MARGIN_BYTES = 64 << 20
GRAPH_MARGIN_PER_SIZE_BYTES = 2 << 20


class MemoryProbe(Protocol):
    def mem_get_info(self) -> tuple[int, int]: ...  # (free, total) bytes on the device
    def synchronize(self) -> None: ...
    def empty_cache(self) -> None: ...
    def reset_peak(self) -> None: ...
    def allocated(self) -> int: ...  # bytes in live tensors of this process
    def peak_allocated(self) -> int: ...  # the most `allocated` since reset_peak


class TorchCudaProbe:
    def __init__(self, device: torch.device) -> None:
        self.device = device

    def mem_get_info(self) -> tuple[int, int]:
        free, total = torch.cuda.mem_get_info(self.device)
        return int(free), int(total)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def empty_cache(self) -> None:
        torch.cuda.empty_cache()

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def allocated(self) -> int:
        return int(torch.cuda.memory_allocated(self.device))

    def peak_allocated(self) -> int:
        return int(torch.cuda.max_memory_allocated(self.device))


@dataclass
class CudaMemoryPlan:
    free: int  # bytes free on the device before the pool (weights loaded, cache emptied)
    total: int
    utilization: float
    activation_peak: int  # bytes above the weights at the largest iteration
    graph_reserve: int  # bytes kept for the CUDA graphs captured after the pool (0 without)
    tokens_profiled: int

    @property
    def kv_budget(self) -> int:
        return max(0, int(self.free * self.utilization) - self.activation_peak - self.graph_reserve)

    def describe(self) -> str:
        g = 2 ** 30
        return (f"{self.free / g:.2f} of {self.total / g:.2f} GiB free; activations at {self.tokens_profiled} tokens "
                f"{self.activation_peak / g:.2f} GiB, CUDA graphs {self.graph_reserve / g:.2f} GiB; "
                f"{self.utilization:.0%} of free less both leaves {self.kv_budget / g:.2f} GiB for the KV pool")


def measure_peak(probe: MemoryProbe, run: Callable[[], None]) -> int:
    """Bytes `run` allocates at its peak above what was live before it (freed again after)."""
    probe.synchronize()
    probe.empty_cache()
    base = probe.allocated()
    probe.reset_peak()
    run()
    probe.synchronize()
    peak = probe.peak_allocated() - base
    probe.empty_cache()
    return max(0, peak)


def graph_reserve(decode_peak: int, num_sizes: int) -> int:
    if num_sizes == 0:
        return 0
    return int(decode_peak * 1.1) + GRAPH_MARGIN_BYTES + num_sizes * GRAPH_MARGIN_PER_SIZE_BYTES


class PlacementError(ConfigError):
    """The ranks asked for cannot be placed on the devices this machine has."""


def rank_device(device: torch.device, local_rank: int, local_ranks: int, device_count: int) -> torch.device:
    """The device of rank `local_rank` of the `local_ranks` this machine runs. CPU stays CPU; on
    CUDA each rank gets a GPU of its own, from `device`'s index on (cuda = cuda:0): two ranks on
    one GPU would share its memory, each sizing its KV pool as if it had the card to itself, and
    NCCL refuses two ranks of one communicator on one device."""
    if device.type != "cuda":
        return device
    first = device.index or 0
    last = first + local_ranks - 1
    if last >= device_count:
        visible = f"{device_count} GPU{'s' if device_count != 1 else ''} visible (CUDA_VISIBLE_DEVICES)"
        if local_ranks == 1:
            raise PlacementError(f"device={str(device)!r} does not exist: {visible}; use cuda:0 .. "
                                 f"cuda:{device_count - 1}")
        raise PlacementError(
            f"{local_ranks} ranks on this machine (tensor_parallel_size x pipeline_parallel_size / nnodes) "
            f"need one GPU each, cuda:{first} .. cuda:{last}, but there {'is' if device_count == 1 else 'are'} "
            f"{visible}; lower tensor_parallel_size / pipeline_parallel_size, spread the ranks over more "
            f"nodes (nnodes), or use device='cpu'")
    return torch.device("cuda", first + local_rank)
