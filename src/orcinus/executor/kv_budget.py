"""A KV budget the device cannot hold is the user's to fix, said before allocating it.

`--kv-cache-memory 1000000000000000` used to fail inside the allocator with "internal error ...
please report it" (issue 19); here it is refused with a ConfigError naming the device's memory.
"""
from __future__ import annotations

import os

import torch

from orcinus.errors import ConfigError


def device_memory_bytes(device: torch.device) -> int | None:
    """All the memory of the device (a CUDA device's total, this machine's physical memory for
    the CPU), or None when it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_kv_budget(budget: int, device: torch.device) -> None:
    total = device_memory_bytes(device)
    if total is not None and budget > total:
        raise ConfigError(f"kv_cache_memory={budget} bytes is more than the {total / 2**30:.1f} GiB of memory this "
                          f"{device.type.upper()} device has; lower --kv-cache-memory (or leave it out for a default)")
