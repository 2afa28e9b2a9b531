"""bench offline's unchunked backends get a finite token budget (orcinus/bench/budgets.py): on
CUDA the runner's upload buffers and the KV sizing's profiling pass are sized by it; and the
warm-up runs the trace's own longest prompts whole, so kernels specialised by shape are built
before the timed run."""
from __future__ import annotations

import pytest
import torch

from orcinus.bench import offline
from orcinus.bench.budgets import UNCHUNKED_BUDGET_CPU, UNCHUNKED_BUDGET_CUDA, unchunked_budget
from orcinus.bench.workloads import BenchRequest
from orcinus.config import EngineConfig


def test_the_unchunked_budget_is_the_device_default_or_the_longest_prompt():
    assert unchunked_budget(torch.device("cpu"), [100, 1024]) == UNCHUNKED_BUDGET_CPU == 2048
    assert unchunked_budget(torch.device("cuda"), [100, 1024]) == UNCHUNKED_BUDGET_CUDA == 8192
    assert unchunked_budget(torch.device("cuda", 1), [9000, 5]) == 9000  # every prompt can run whole


class _Stop(Exception):
    pass


@pytest.mark.parametrize("backend, flag, want", [("paged", None, UNCHUNKED_BUDGET_CPU), ("orca", None, 3000),
                                                 ("paged-chunked", None, offline.CHUNKED_BUDGET),
                                                 ("paged", 777, 777)])
def test_bench_offline_gives_each_orcinus_backend_a_finite_budget(backend, flag, want, monkeypatch):
    seen = {}

    def fake_llm(**kwargs):
        seen.update(kwargs)
        raise _Stop

    monkeypatch.setattr("orcinus.engine.llm.LLM", fake_llm)
    trace = [BenchRequest(list(range(3, 3 + n)), 4) for n in ((3000, 10) if want == 3000 else (10, 20))]
    with pytest.raises(_Stop):
        offline.run_orcinus(EngineConfig(device="cpu", max_num_batched_tokens=flag), backend, trace, progress=False)
    assert seen["max_num_batched_tokens"] == want


def test_the_warm_up_runs_the_longest_prompts_whole():
    trace = [BenchRequest(list(range(n)), 50) for n in (5, 900, 40, 1000, 7, 300)]
    warm = offline._warmup_requests(trace)
    assert [r.prompt_len for r in warm] == [1000, 900, 300, 40]
    assert all(r.output_len == offline.WARMUP_OUTPUT_TOKENS for r in warm)
    # reversed, so that no timed request finds the warm-up's blocks in the prefix cache
    assert warm[0].prompt_token_ids == list(range(999, -1, -1))
