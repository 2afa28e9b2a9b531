"""The model runner's batch preparation: every backend builds its typed metadata in one step
before the forward pass, so no layer copies host data to the device; and KV sizing."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from orcinus.attention.batched import BatchedMetadata
from orcinus.config import EngineConfig
from orcinus.executor.messages import BatchMessage, CachedRequestData, NewRequestData, SamplingSettings
from orcinus.executor.worker import Worker

GREEDY = SamplingSettings(temperature=0.0)


def _no_host_data(*_a, **_k):
    raise AssertionError("a tensor was made from host data during the forward pass")


@pytest.mark.parametrize("backend", ["reference", "batched"])
@pytest.mark.parametrize("arch", ["mistral", "gpt2"])  # mistral: sliding window + GQA
def test_forward_makes_no_tensor_from_host_data(backend, arch, checkpoint_factory, monkeypatch):
    folder, _ = checkpoint_factory(arch)
    worker = Worker(EngineConfig(model=folder, dtype="float32", kv_cache_memory=1 << 20, block_size=4,
                                 attention_backend=backend))
    worker.initialize_kv_cache(worker.available_kv_blocks())
    worker.execute(BatchMessage(0, [NewRequestData("a", list(range(3, 33)), GREEDY, list(range(8)))]))
    # A mixed batch: one increment (after 30 tokens: past the sliding window of 24) and one initiation.
    msg = BatchMessage(1, [CachedRequestData("a", 40), NewRequestData("b", [7, 8, 9], GREEDY, [9])])
    rows, undo = worker.states.apply(msg)
    inp = worker.runner.prepare(rows)
    if backend == "batched":
        assert isinstance(inp.meta, BatchedMetadata) and inp.meta.prefill == [(1, 1, 3, 3)]
    with monkeypatch.context() as m:
        for name in ("tensor", "as_tensor", "from_numpy"):
            m.setattr(torch, name, _no_host_data)
        logits = worker.runner.forward_logits(inp)
    assert logits.shape == (2, worker.model_config.vocab_size) and torch.isfinite(logits).all()
    worker.states.rollback(undo)


def test_profile_run_executes_the_largest_batch_and_kv_blocks_follow_the_budget(checkpoint_factory):
    folder, _ = checkpoint_factory("llama")
    cfg = EngineConfig(model=folder, dtype="float32", kv_cache_memory=1 << 20, block_size=4, max_num_seqs=3,
                       max_model_len=40)
    worker = Worker(cfg)
    seen: list[tuple[int, int]] = []
    original = worker.runner.forward_logits
    worker.runner.forward_logits = lambda inp: seen.append((len(inp.num_new_tokens), int(inp.input_ids.numel()))) \
        or original(inp)
    worker.profile_run()
    assert seen == [(3, 3 * 40)]  # max_num_seqs rows of max_model_len tokens each
    per_block = worker.runner.kv_bytes_per_block()
    assert per_block == 2 * 2 * 4 * 2 * 16 * 4  # k and v, 2 layers, 4 slots, 2 kv heads of 16 floats
    assert worker.available_kv_blocks() == (1 << 20) // per_block


@pytest.mark.parametrize("backend", ["reference", "batched", "paged"])
def test_packed_upload_gives_bit_identical_logits_with_one_copy_per_iteration(backend, checkpoint_factory):
    """The CUDA path packs every metadata array into one buffer copied once; run here with a CPU
    "device" buffer, a mixed batch must give exactly the logits of the zero-copy CPU path."""
    from orcinus.executor.host_staging import PackedUpload, zero_copy_upload

    folder, _ = checkpoint_factory("mistral")
    worker = Worker(EngineConfig(model=folder, dtype="float32", kv_cache_memory=1 << 20, block_size=4,
                                 attention_backend=backend))
    worker.initialize_kv_cache(worker.available_kv_blocks())
    assert worker.runner.upload is zero_copy_upload  # CPU: no copies at all
    worker.execute(BatchMessage(0, [NewRequestData("a", list(range(3, 33)), GREEDY, [5, 2, 7, 1, 0, 3, 4, 6])]))
    # increment of "a" (non-consecutive blocks), a fresh prompt, and a second chunk of a prompt
    msg = BatchMessage(1, [CachedRequestData("a", 40), NewRequestData("b", [7, 8, 9], GREEDY, [9]),
                           NewRequestData("c", list(range(50, 70)), GREEDY, [10, 11, 12, 13, 14],
                                          num_computed_tokens=0, num_new_tokens=12, samples=False)])
    rows, undo = worker.states.apply(msg)
    want = worker.runner.forward_logits(worker.runner.prepare(rows))
    packed = PackedUpload(torch.device("cpu"), capacity=1 << 16)
    worker.runner.upload = packed
    for it in range(2):  # the second iteration reuses (overwrites) the same buffers
        inp = worker.runner.prepare(rows)
        assert packed.copies == it + 1 and packed.overflows == 0
        got = worker.runner.forward_logits(inp)
        assert got.shape == (2, worker.model_config.vocab_size)  # "c"'s chunk samples nothing
        assert torch.equal(got, want)
    worker.states.rollback(undo)
