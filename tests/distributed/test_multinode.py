"""Two "nodes" on loopback: the engine runs node 0's ranks, a separate launcher runs node 1's
(`python -m orcinus.distributed.launch`, standard MASTER_ADDR / MASTER_PORT), and they serve one
model together; a node that never joins fails start-up with a message naming what to set."""
from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys

import pytest

from orcinus.config import EngineConfig
from orcinus.engine.llm_engine import LLMEngine
from orcinus.executor.executor import WorkerDied
from orcinus.executor.multiproc import free_port
from orcinus.sampling_params import SamplingParams

PROMPTS = [[5, 6, 7, 8], [9, 10, 11]]
FLAGS = dict(kv_cache_memory=1 << 22, block_size=4, dtype="float32", skip_tokenizer_init=True)


def _generate(engine: LLMEngine) -> list[list[int]]:
    for i, p in enumerate(PROMPTS):
        engine.add_request(f"r{i}", {"prompt_token_ids": p}, SamplingParams(max_tokens=5, temperature=0.0,
                                                                           ignore_eos=True))
    out = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                out[o.request_id] = o.outputs[0].token_ids
    return [out[f"r{i}"] for i in range(len(PROMPTS))]


@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2)])  # split within layers, or by stage, across nodes
def test_two_nodes_serve_one_model(tp, pp, checkpoint_factory, monkeypatch):
    folder, _ = checkpoint_factory("llama")
    port = free_port()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    node1 = subprocess.Popen(
        [sys.executable, "-m", "orcinus.distributed.launch", "--node-rank", "1", "--nnodes", "2", "--model", folder,
         "--tensor-parallel-size", str(tp), "--pipeline-parallel-size", str(pp), "--kv-cache-memory", str(1 << 22),
         "--block-size", "4", "--dtype", "float32", "--skip-tokenizer-init"], env=env)
    try:
        engine = LLMEngine(EngineConfig(model=folder, nnodes=2, tensor_parallel_size=tp, pipeline_parallel_size=pp,
                                        **FLAGS))
        assert sum(p is None for p in engine.executor._procs) == 1  # one rank lives on the other node
        got = _generate(engine)
        engine.shutdown()
        assert node1.wait(timeout=60) == 0  # the launcher ends when the engine shuts down
    finally:
        if node1.poll() is None:
            node1.kill()
            node1.wait()
    assert got == _generate(LLMEngine(EngineConfig(model=folder, **FLAGS)))
    assert not multiprocessing.active_children()


def test_node_that_never_joins_fails_start_up_naming_the_settings(checkpoint_factory, monkeypatch):
    folder, _ = checkpoint_factory("llama")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    with pytest.raises(WorkerDied, match=r"ranks \[1\] did not join.*--node-rank.*MASTER_ADDR=127.0.0.1"):
        LLMEngine(EngineConfig(model=folder, nnodes=2, tensor_parallel_size=2, distributed_timeout_s=3, **FLAGS))
    assert not multiprocessing.active_children()


def test_several_nodes_need_the_rendezvous_settings(checkpoint_factory, monkeypatch):
    folder, _ = checkpoint_factory("llama")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(ValueError, match="MASTER_ADDR.*MASTER_PORT"):
        LLMEngine(EngineConfig(model=folder, nnodes=2, tensor_parallel_size=2, **FLAGS))
