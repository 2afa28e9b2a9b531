"""CUDA KV sizing (orcinus/executor/cuda_memory.py) run for real on the CPU against a simulated
card: the worker's own sizing code profiles the tiny model, and the simulated card counts what
each step would hold on a GPU (weights, the KV pool, one iteration's activations, the CUDA
graphs' pool). For every token budget the pool it picks must leave room for the largest
iteration the engine may then run and for the graphs captured after it; and rank placement
refuses what cannot work."""
from __future__ import annotations

import pytest
import torch

from orcinus.config import EngineConfig
from orcinus.executor.cuda_graphs import GraphPlan, capture_sizes
from orcinus.executor.cuda_memory import CudaMemoryPlan, PlacementError, rank_device
from orcinus.executor.worker import Worker

GiB = 1 << 30
MAX_NUM_SEQS = 8


class SimulatedCard:
    """A GPU's memory as the sizing sees it. `per_token` bytes of activations for each token of a
    forward pass, `per_logit_row` for each sampled row; `others` is taken by other processes."""

    def __init__(self, total: int, others: int, weights: int, per_token: int, per_logit_row: int) -> None:
        self.total, self.others, self.weights = total, others, weights
        self.per_token, self.per_logit_row = per_token, per_logit_row
        self.kv = 0
        self.peak = 0
        self.tokens_seen: list[int] = []

    def attach(self, worker: Worker) -> None:
        """Count the worker's pool and forward passes (which run for real, on the CPU)."""
        runner = worker.runner
        allocate, forward_stage, forward_logits = runner.allocate_kv_cache, runner.forward_stage, runner.forward_logits

        def allocate_kv_cache(n: int) -> None:
            allocate(n)
            self.kv = (n + (1 if runner.graph_plan.enabled else 0)) * runner.kv_bytes_per_block() if n else 0

        def transient(tokens: int, rows: int) -> None:
            self.tokens_seen.append(tokens)
            self.peak = max(self.peak, self.allocated() + tokens * self.per_token + rows * self.per_logit_row)

        def stage(inp, hidden=None):
            transient(len(inp.input_ids), 0)
            return forward_stage(inp, hidden)

        def logits(inp, hidden=None):
            transient(len(inp.input_ids), len(inp.sample_indices))
            return forward_logits(inp, hidden)

        runner.allocate_kv_cache, runner.forward_stage, runner.forward_logits = allocate_kv_cache, stage, logits
        worker.memory_probe = self

    # the MemoryProbe interface
    def allocated(self) -> int:
        return self.weights + self.kv

    def mem_get_info(self) -> tuple[int, int]:
        return self.total - self.others - self.allocated(), self.total

    def synchronize(self) -> None:
        pass

    def empty_cache(self) -> None:
        pass

    def reset_peak(self) -> None:
        self.peak = self.allocated()

    def peak_allocated(self) -> int:
        return max(self.peak, self.allocated())


def _worker(folder: str, budget: int, utilization: float, graphs: bool) -> Worker:
    worker = Worker(EngineConfig(model=folder, dtype="float32", device="cpu", block_size=16, max_num_seqs=MAX_NUM_SEQS,
                                 max_num_batched_tokens=budget, gpu_memory_utilization=utilization))
    if graphs:  # as on CUDA with the Triton backend (the plan is what the sizing reads)
        worker.runner.graph_plan = GraphPlan(True, capture_sizes(MAX_NUM_SEQS))
    return worker


@pytest.mark.parametrize("graphs", [True, False])
@pytest.mark.parametrize("utilization", [1.0, 0.85])
@pytest.mark.parametrize("budget", [MAX_NUM_SEQS, 100, 512, 2048, 1 << 30])
def test_the_pool_leaves_room_for_the_largest_iteration_and_the_graphs(budget, utilization, graphs,
                                                                      checkpoint_factory):
    folder, _ = checkpoint_factory("llama")
    worker = _worker(folder, budget, utilization, graphs)
    card = SimulatedCard(total=80 * GiB, others=5 * GiB, weights=16 * GiB, per_token=1 << 20, per_logit_row=4 << 20)
    card.attach(worker)
    free_before = card.mem_get_info()[0]
    blocks = worker.available_kv_blocks()
    plan: CudaMemoryPlan = worker.memory_plan
    # the largest iteration the engine may run: the budget, but never more than its rows can hold
    largest = min(budget, MAX_NUM_SEQS * worker.max_model_len)
    assert plan.tokens_profiled == largest and max(card.tokens_seen) == largest  # profiled at the real budget
    assert plan.free == free_before  # free memory, not the card's total
    pool = (blocks + (1 if graphs else 0)) * worker.runner.kv_bytes_per_block()
    iteration = largest * card.per_token + MAX_NUM_SEQS * card.per_logit_row
    graph_pool = MAX_NUM_SEQS * card.per_token if graphs else 0  # the largest captured decode batch
    assert plan.graph_reserve >= graph_pool
    # what the card must hold while serving: it fits in the share of free memory asked for
    assert pool + iteration + graph_pool <= free_before * utilization
    # and the sizing does not waste it: the pool is within one block and the margins of that share
    slack = free_before * utilization - (pool + iteration + graph_pool)
    assert slack <= worker.runner.kv_bytes_per_block() + (plan.graph_reserve - graph_pool) + 1
    assert worker.runner.kv_caches == [] or worker.runner.num_blocks == 0  # the throwaway pool is gone


def test_an_iteration_that_cannot_fit_says_what_to_lower(checkpoint_factory):
    folder, _ = checkpoint_factory("llama")
    worker = _worker(folder, 2048, 0.9, graphs=True)
    SimulatedCard(total=20 * GiB, others=1 * GiB, weights=16 * GiB, per_token=2 << 20, per_logit_row=0).attach(worker)
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        worker.available_kv_blocks()


def test_each_rank_gets_a_gpu_of_its_own_or_a_clear_error():
    cuda = torch.device("cuda")
    assert rank_device(torch.device("cpu"), 1, 2, 0) == torch.device("cpu")
    assert rank_device(cuda, 0, 1, 1) == torch.device("cuda", 0)
    assert [rank_device(torch.device("cuda", 2), r, 2, 4) for r in (0, 1)] == [torch.device("cuda", 2),
                                                                              torch.device("cuda", 3)]
    with pytest.raises(PlacementError, match="2 ranks .* need one GPU each, cuda:0 .. cuda:1.*1 GPU visible"):
        rank_device(cuda, 0, 2, 1)  # tensor_parallel_size=2 on one GPU: both ranks would be cuda:0
    with pytest.raises(PlacementError, match="'cuda:1' does not exist"):
        rank_device(torch.device("cuda", 1), 0, 1, 1)


def test_a_multiprocess_engine_refuses_two_ranks_on_one_gpu_before_starting(monkeypatch, checkpoint_factory):
    from orcinus.executor import multiproc

    folder, _ = checkpoint_factory("llama")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    started = []
    monkeypatch.setattr(multiproc, "spawn_worker", lambda *a, **k: started.append(a))
    with pytest.raises(PlacementError, match="lower tensor_parallel_size"):
        multiproc.MultiprocExecutor(EngineConfig(model=folder, device="cuda", tensor_parallel_size=2))
    assert started == []
