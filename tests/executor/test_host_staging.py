"""The packed upload: one host buffer, one device buffer, one copy per iteration. Checked here
with a CPU "device" buffer (a separate tensor the one copy writes into), which exercises the
packing, the dtype views and the growth exactly as on CUDA, where the host side is pinned."""
from __future__ import annotations

import numpy as np
import torch

from orcinus.executor.host_staging import PackedUpload, StaticBuffers, zero_copy_upload

CPU = torch.device("cpu")


def _arrays(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [
        rng.integers(0, 1 << 40, size=7, dtype=np.int64),
        rng.integers(-5, 5, size=(3, 5), dtype=np.int64),
        rng.integers(0, 100, size=4).astype(np.int32),
        rng.random((2, 1, 1, 6)) < 0.5,  # the batched backend's key mask
        np.zeros((0, 0), dtype=np.int64),  # no decode rows
        rng.integers(0, 9, size=(5, 4), dtype=np.int64)[:, 1],  # not contiguous
    ]


def test_every_array_arrives_through_one_copy_per_iteration():
    up = PackedUpload(CPU, capacity=4096)
    for it in range(3):  # the buffers are reused: later iterations overwrite earlier ones' data
        arrays = _arrays(it)
        up.begin()
        tensors = [up(a) for a in arrays]
        assert up.copies == it  # nothing is copied before flush
        up.flush()
        assert up.copies == it + 1
        for a, t in zip(arrays, tensors):
            assert t.dtype == torch.from_numpy(np.ascontiguousarray(a)).dtype and tuple(t.shape) == a.shape
            assert np.array_equal(t.numpy(), a)
        # every tensor is a view of the one device buffer
        base = tensors[0].untyped_storage().data_ptr()
        assert all(t.untyped_storage().data_ptr() == base for t in tensors)
    assert up.overflows == 0


def test_an_iteration_larger_than_the_buffer_still_arrives_and_the_buffer_grows():
    up = PackedUpload(CPU, capacity=64)
    arrays = _arrays(1)
    up.begin()
    tensors = [up(a) for a in arrays]
    up.flush()
    assert up.overflows > 0
    assert all(np.array_equal(t.numpy(), a) for a, t in zip(arrays, tensors))
    grown = up.overflows
    up.begin()
    assert up.capacity > 64
    tensors = [up(a) for a in arrays]
    up.flush()
    assert up.overflows == grown  # everything fits now
    assert all(np.array_equal(t.numpy(), a) for a, t in zip(arrays, tensors))


def test_zero_copy_upload_shares_the_arrays_memory_on_cpu():
    a = np.arange(6, dtype=np.int64)
    t = zero_copy_upload(a)
    a[2] = 99
    assert int(t[2]) == 99


def test_static_buffers_keep_fixed_addresses_and_copy_a_prefix():
    buf = StaticBuffers(CPU, [("a", np.int64, (4,)), ("b", np.int32, (3,)), ("table", np.int64, (4, 5))])
    addresses = {n: t.data_ptr() for n, t in buf.dev.items()}
    assert len(set(addresses.values())) == 3
    buf.host["a"][:] = [1, 2, 3, 4]
    buf.host["b"][:] = [5, 6, 7]
    buf.host["table"][:] = np.arange(20).reshape(4, 5)
    buf.upload()
    assert buf.dev["b"].tolist() == [5, 6, 7] and buf.dev["table"][3].tolist() == [15, 16, 17, 18, 19]
    buf.host["a"][:] = 0
    buf.host["table"][:] = -1
    buf.upload(buf.offsets["table"] + 2 * 5 * 8)  # the regions before the table and its first 2 rows
    assert buf.dev["a"].tolist() == [0, 0, 0, 0]
    assert buf.dev["table"][:2].eq(-1).all() and buf.dev["table"][2:].ge(10).all()
    assert {n: t.data_ptr() for n, t in buf.dev.items()} == addresses
    assert buf.copies == 2
