"""Per-iteration metadata goes to the device in ONE host-to-device copy.

Every iteration the model runner and the attention backend turn a batch into a handful of small
integer arrays (token ids, positions, slots, block tables, query starts...). Uploading each one
separately costs a pinned allocation and a copy launch per array; here they are packed into one
persistent host buffer (pinned on CUDA) and copied with one `copy_` into one persistent device
buffer, whose slices are the tensors the forward pass reads.

`PackedUpload` hands out the device slice of each array at once (the data arrives at `flush`, which
the runner calls before the forward pass; the copy and the kernels are ordered on one stream).
`StaticBuffers` is the fixed-layout variant the CUDA graphs read from (named regions at fixed
addresses). Both wait, before overwriting their host buffer, until the previous copy out of it is
done: with the sampler's synchronisation at the end of each iteration it always already is, so
the forward pass itself never waits on the device.

On CPU the runner does not use these at all: a numpy array's memory is already where the forward
pass reads it (`zero_copy_upload`).
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

ALIGN = 64  # bytes; a slice may be viewed as any dtype, and cache lines are not shared


def align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def zero_copy_upload(array: np.ndarray) -> torch.Tensor:
    """CPU: the tensor shares the numpy array's memory, no copy."""
    return torch.from_numpy(np.ascontiguousarray(array))


@lru_cache(maxsize=None)
def torch_dtype(dtype: np.dtype) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype=dtype)).dtype


class _HostDevicePair:
    """One host buffer (pinned on CUDA) and one device buffer of the same size, in bytes."""

    def __init__(self, device: torch.device, capacity: int) -> None:
        self.device = device
        self._event: torch.cuda.Event | None = None
        self.copies = 0  # host-to-device copies issued (one per iteration)
        self._allocate(capacity)

    def _allocate(self, capacity: int) -> None:
        self.capacity = align(max(capacity, ALIGN))
        pin = self.device.type == "cuda"
        self._host = torch.empty(self.capacity, dtype=torch.uint8, pin_memory=pin)
        self._host_np = self._host.numpy()
        self._dev = torch.empty(self.capacity, dtype=torch.uint8, device=self.device)

    def wait_host_free(self) -> None:
        """The previous copy out of the host buffer must finish before it is overwritten. The
        sampler synchronised since, so in practice this returns at once (no device wait)."""
        if self._event is not None and not self._event.query():
            self._event.synchronize()
        self._event = None

    def _copy(self, nbytes: int) -> None:
        if nbytes <= 0:
            return
        self._dev[:nbytes].copy_(self._host[:nbytes], non_blocking=True)
        self.copies += 1
        if self.device.type == "cuda":
            self._event = torch.cuda.Event()
            self._event.record(torch.cuda.current_stream(self.device))

    def _device_view(self, offset: int, dtype: np.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        return self._dev[offset:offset + nbytes].view(torch_dtype(dtype)).view(shape)

    def _host_view(self, offset: int, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        return self._host_np[offset:offset + nbytes].view(dtype).reshape(shape)


class PackedUpload(_HostDevicePair):
    """The `Upload` callable of one iteration: `begin()`, any number of calls with an array
    (each returns the device tensor the array will be in), then `flush()`: one copy.

    An iteration that needs more than the capacity still works: arrays past the end are uploaded
    on their own (as before this class existed) and the buffers grow at the next `begin()`."""

    def __init__(self, device: torch.device, capacity: int) -> None:
        super().__init__(device, capacity)
        self.used = 0
        self._grow_to = 0
        self.overflows = 0  # arrays that did not fit (each one its own copy)

    def begin(self) -> None:
        self.wait_host_free()
        if self._grow_to > self.capacity:
            # Tensors of the previous iteration keep the old device buffer alive until they go.
            self._allocate(self._grow_to)
        self.used = 0

    def __call__(self, array: np.ndarray) -> torch.Tensor:
        a = np.ascontiguousarray(array)
        offset = align(self.used)
        end = offset + a.nbytes
        if end > self.capacity:
            self._grow_to = max(self._grow_to, 2 * end)
            self.overflows += 1
            t = torch.from_numpy(a.copy())
            return t.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" \
                else t.to(self.device)
        self._host_np[offset:end] = a.reshape(-1).view(np.uint8)
        self.used = end
        return self._device_view(offset, a.dtype, a.shape)

    def flush(self) -> None:
        self._copy(self.used)


class StaticBuffers(_HostDevicePair):
    """Named arrays at fixed addresses (CUDA graphs read their inputs from fixed addresses).
    Fill `host[name]` (numpy views), then `upload(nbytes)` copies the first nbytes (all when
    None) in one copy; `dev[name]` are the device tensors. `end(name)` is where a region ends,
    so a prefix copy can stop there."""

    def __init__(self, device: torch.device, specs: list[tuple[str, np.dtype, tuple[int, ...]]]) -> None:
        offsets, used = {}, 0
        for name, dtype, shape in specs:
            offsets[name] = used
            used = align(used + int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize)
        super().__init__(device, used)
        self.offsets = offsets
        self.host = {n: self._host_view(offsets[n], np.dtype(d), s) for n, d, s in specs}
        self.dev = {n: self._device_view(offsets[n], np.dtype(d), s) for n, d, s in specs}

    def upload(self, nbytes: int | None = None) -> None:
        self._copy(self.capacity if nbytes is None else min(nbytes, self.capacity))
