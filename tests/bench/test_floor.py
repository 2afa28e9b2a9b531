"""The physical floor: the ideal schedule, per-iteration bytes and flops, and device measurement."""
import pytest
import torch

from orcinus.bench.floor import (DeviceRates, Iteration, ModelDims, ideal_schedule, iteration_cost, measure_device,
                                 static_batch_iterations, trace_floor)

DIMS = ModelDims(num_layers=2, hidden_size=8, num_heads=2, num_kv_heads=1, head_dim=4, intermediate_size=16,
                 vocab_size=32, weight_bytes_per_param=4, kv_bytes_per_elem=4)


def test_model_dims_counts():
    # per layer: q 8x8 + k,v 2 * 8x4 + o 8x8 + mlp 3 * 8x16 = 64 + 64 + 64 + 384
    assert DIMS.layer_linear_params == 576
    assert DIMS.linear_params == 1152
    # + norms (2 per layer + final) * 8 + LM head 32 x 8
    assert DIMS.weight_bytes_per_iteration == 4 * (1152 + 5 * 8 + 256)
    assert DIMS.kv_bytes_per_token == 2 * 2 * 1 * 4 * 4
    # one query after 3 cached tokens sees 4 keys: 4 flops * layers * heads * head_dim * 4
    assert DIMS.attention_flops(1, 3) == 4 * 2 * 2 * 4 * 4
    assert DIMS.attention_flops(3, 0) == 4 * 2 * 2 * 4 * 6  # causal: 1 + 2 + 3 keys


def test_ideal_schedule_is_iteration_level():
    its = list(ideal_schedule([3, 5, 2], [2, 3, 1], max_num_seqs=2))
    assert its == [
        Iteration((3, 5), ()),      # both prefill and emit their first token
        Iteration((), (3, 5)),      # request 0 emits its last token; request 1 its second
        Iteration((2,), (6,)),      # request 2 takes the freed seat at once
    ]
    assert sum(it.num_sampled for it in its) == 2 + 3 + 1  # one sampled token per output token


def test_request_level_iterations():
    # batches [5, 1] and [2, 2] run 5 and 2 iterations; iteration-level needs only 5 + ... = 5
    assert static_batch_iterations([5, 1, 2, 2], 2) == 7
    assert sum(1 for _ in ideal_schedule([4] * 4, [5, 1, 2, 2], 2)) == 5
    assert static_batch_iterations([5, 1, 2, 2], 4) == 5


def test_iteration_cost_and_floor():
    it = Iteration((3,), (5,))
    moved, flops = iteration_cost(DIMS, it)
    assert moved == DIMS.weight_bytes_per_iteration + (5 + 4) * 64  # read 5 cached, write 4 new
    assert flops == (2 * 1152 * 4 + 2 * 8 * 32 * 2 + DIMS.attention_flops(3, 0) + DIMS.attention_flops(1, 5))
    rates = DeviceRates(copy_bandwidth=1e3, matmul_flops=1e9, label="test")  # memory-bound
    floor = trace_floor(DIMS, [3], [2], 1, rates)
    assert floor.num_iterations == 2 and floor.output_tokens == 2
    assert floor.seconds == pytest.approx(floor.memory_seconds)
    assert floor.fraction_achieved(floor.seconds * 4) == pytest.approx(0.25)


def test_measure_device_on_cpu():
    rates = measure_device(torch.device("cpu"), torch.float32, copy_bytes=1 << 22, matmul_n=128, repeats=2)
    assert rates.copy_bandwidth > 1e8 and rates.matmul_flops > 1e7
    assert rates.label.startswith("cpu")
