"""The cost model's flops and bytes against hand-computed values for a small model."""
from __future__ import annotations

import pytest

from orcinus.sim.cost_model import BatchShape, CostModel, Parallel
from orcinus.sim.hardware import Hardware, HardwareError, Link, Overhead, load_hardware, presets
from orcinus.sim.shapes import ModelShape

# h=64, 4 heads of 16, 2 KV heads, MLP 128 (gated), vocab 100, 2 layers
SMALL = ModelShape("small", num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16,
                   intermediate_size=128, vocab_size=100, max_position_embeddings=512)
UNIT = Hardware("unit", memory_bytes=1e9, peak_flops=1e9, memory_bandwidth=1e9, devices_per_node=8,
                intra_node=Link(1e8, 1e-5), inter_node=Link(1e7, 1e-4),
                efficiency={"gemm": 1.0, "memory": 1.0, "attention": 1.0, "comm": 1.0}, overhead=Overhead())


def test_batch_shape_sums_rows() -> None:
    # a 3-token prompt and a decode after 10 tokens
    b = BatchShape.of([(3, 0, True), (1, 10, True)])
    assert (b.tokens, b.rows, b.sampled) == (4, 2, 2)
    assert b.keys_seen == (1 + 2 + 3) + 11  # causal within the prompt; the decode sees 10 + itself
    assert b.kv_tokens == 3 + 11


def test_flops_and_bytes_by_hand_one_device() -> None:
    cost = CostModel(SMALL, UNIT, Parallel(1, 1), "float16")
    b = BatchShape.of([(3, 0, True), (1, 10, True)])
    w = cost.stage_work(b, 0)
    # per layer: q 64x64, k,v 64x32 each, o 64x64, MLP 3 x 64x128 = 4096+2048+2048+4096+24576 = 36864
    assert SMALL.layer_linear_params == 36864
    assert w.gemm_flops == 2 * 4 * 36864 * 2 + 2 * 2 * 100 * 64  # 4 tokens, 2 layers; LM head on 2 rows
    assert w.gemm_bytes == (36864 * 2 + 100 * 64) * 2
    assert w.attn_flops == 4 * 4 * 16 * 17 * 2  # 4 heads x 16 dims x 17 keys x 2 layers
    # K and V of 2 heads x 16 dims, 2 bytes, over (14 touched + 4 written) tokens, 2 layers
    assert w.attn_bytes == 2 * 2 * 16 * 2 * 18 * 2
    assert w.comm_bytes == 0 and w.send_bytes == 0
    t = cost.stage_time(b, 0)
    assert t.gemm == pytest.approx(max(w.gemm_flops / 1e9, w.gemm_bytes / 1e9))
    assert t.attention == pytest.approx(max(w.attn_flops / 1e9, w.attn_bytes / 1e9))


def test_tensor_and_pipeline_parallel_by_hand() -> None:
    cost = CostModel(SMALL, UNIT, Parallel(2, 2), "float16")
    b = BatchShape.of([(1, 7, True)] * 4)
    first, last = cost.stage_work(b, 0), cost.stage_work(b, 1)
    assert cost.stage_layers == [1, 1]
    assert first.gemm_flops == 2 * 4 * 36864 / 2  # one layer, half of it
    assert first.send_bytes == 4 * 64 * 2  # 4 tokens of hidden 64 in float16 to the next stage
    assert last.send_bytes == 0
    # two all-reduces per layer of 4 x 64 float16 activations, ring: 2 (t-1)/t of the bytes
    assert first.comm_bytes == 2 * 1 * 2 * (1 / 2) * 4 * 64 * 2
    assert first.comm_steps == 2 * 1 * 2 * 1
    # the last stage also all-gathers the float32 logits of 4 rows
    assert last.comm_bytes == first.comm_bytes + 0.5 * 4 * 100 * 4
    t0 = cost.stage_time(b, 0)
    assert t0.send == pytest.approx(first.send_bytes / 1e8 + 1e-5)  # 4 devices fit a node: intra-node link
    assert t0.comm == pytest.approx(first.comm_bytes / 1e8 + first.comm_steps * 1e-5)


def test_kv_capacity_and_weights_that_do_not_fit() -> None:
    cost = CostModel(SMALL, UNIT, Parallel(1, 1), "float16")
    per_token = 2 * 2 * 2 * 16 * 2  # K+V, 2 layers, 2 heads, 16 dims, 2 bytes
    assert cost.kv_capacity_tokens(1_000_000) == 1_000_000 // per_token
    from orcinus.sim.shapes import PRESETS

    with pytest.raises(HardwareError, match="does not fit"):
        CostModel(PRESETS["gpt3-175b"], load_hardware("a100-80gb"), Parallel(1, 1)).kv_capacity_tokens()


def test_every_preset_loads_and_names_its_sources() -> None:
    names = presets()
    assert {"a100-40gb", "a100-80gb", "h100", "h200", "xeon-2core"} <= set(names)
    for name in names:
        hw = load_hardware(name)
        assert hw.sources and hw.peak_flops > 0 and hw.memory_bandwidth > 0
    with pytest.raises(HardwareError, match="unknown hardware"):
        load_hardware("tpu-v9")
