"""CUDA KV sizing on a real GPU (the gpu tier; the sizing's arithmetic is checked on the CPU
against a simulated card in test_cuda_memory.py): the pool it picks leaves room for the CUDA
graphs and for an iteration at the whole token budget, and the device is this thread's."""
from __future__ import annotations

import pytest
import torch

from orcinus.config import EngineConfig
from orcinus.executor.messages import BatchMessage, NewRequestData, SamplingSettings
from orcinus.executor.worker import Worker

pytestmark = pytest.mark.gpu


def test_sized_pool_graphs_and_a_full_budget_iteration_fit(checkpoint_factory):
    pytest.importorskip("triton", reason="CUDA graphs capture the Triton backend; install triton")
    folder, _ = checkpoint_factory("qwen3")
    budget, seqs = 4096, 16
    worker = Worker(EngineConfig(model=folder, dtype="bfloat16", device="cuda", block_size=16, max_num_seqs=seqs,
                                 max_num_batched_tokens=budget, gpu_memory_utilization=0.5))
    assert torch.cuda.current_device() == worker.device.index
    blocks = worker.available_kv_blocks()
    plan = worker.memory_plan
    assert plan is not None and plan.tokens_profiled == budget and plan.activation_peak > 0
    assert plan.graph_reserve > 0
    free, _ = torch.cuda.mem_get_info()
    assert blocks * worker.runner.kv_bytes_per_block() <= plan.kv_budget <= free * 0.5
    worker.initialize_kv_cache(blocks)
    assert worker.runner.graphs is not None
    assert worker.runner.graphs.memory_bytes <= plan.graph_reserve
    # an iteration at the whole budget runs next to the full pool and the graphs
    n = budget // seqs
    news = [NewRequestData(f"r{i}", [5] * n, SamplingSettings(temperature=0.0), list(range(i * (n // 16 + 1),
                                                                                       (i + 1) * (n // 16 + 1))))
            for i in range(seqs)]
    out = worker.execute(BatchMessage(0, news))
    assert len(out.token_ids) == seqs
    torch.cuda.synchronize()
    assert torch.cuda.mem_get_info()[0] > 0
