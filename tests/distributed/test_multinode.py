"""Two "nodes" on loopback: the engine runs node 0's ranks, a separate launcher runs node 1's
(`python -m orcinus.distributed.launch`, standard MASTER_ADDR / MASTER_PORT), and they serve one
model together; a node that never joins fails start-up with a message naming what to set. There
is no default cluster key; a node with a wrong key (or a stranger) is refused and logged while the
engine waits for the right one; the launcher says what went wrong in one line (issue 19)."""
from __future__ import annotations

import logging
import multiprocessing
import os
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from orcinus.config import ConfigError, EngineConfig
from orcinus.distributed.network import ClusterJoinError
from orcinus.engine.llm_engine import LLMEngine
from orcinus.executor.multiproc import free_port
from orcinus.sampling_params import SamplingParams

PROMPTS = [[5, 6, 7, 8], [9, 10, 11]]
FLAGS = dict(kv_cache_memory=1 << 22, block_size=4, dtype="float32", skip_tokenizer_init=True)
KEY = "a-test-key-of-32-characters-0001"
LAUNCHER_TIMEOUT_S = 600  # only so that a regression fails instead of hanging CI


@pytest.fixture(autouse=True)
def cluster_key(monkeypatch) -> None:
    monkeypatch.setenv("ORCINUS_CLUSTER_KEY", KEY)


def _launcher(folder: str, tp: int, pp: int, key: str = KEY, node_rank: str = "1", timeout_s: int = 120
              ) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p), "ORCINUS_CLUSTER_KEY": key}
    return subprocess.Popen(
        [sys.executable, "-m", "orcinus.distributed.launch", "--node-rank", node_rank, "--nnodes", "2", "--model",
         folder, "--tensor-parallel-size", str(tp), "--pipeline-parallel-size", str(pp), "--kv-cache-memory",
         str(1 << 22), "--block-size", "4", "--dtype", "float32", "--skip-tokenizer-init",
         "--distributed-timeout-s", str(timeout_s)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)


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
    node1 = _launcher(folder, tp, pp)
    try:
        engine = LLMEngine(EngineConfig(model=folder, nnodes=2, tensor_parallel_size=tp, pipeline_parallel_size=pp,
                                        **FLAGS))
        assert sum(p is None for p in engine.executor._procs) == 1  # one rank lives on the other node
        got = _generate(engine)
        engine.shutdown()
        out, err = node1.communicate(timeout=LAUNCHER_TIMEOUT_S)
        assert node1.returncode == 0, err  # the launcher ends when the engine shuts down
        assert "joined the engine" in out and "the engine shut down" in out and "Traceback" not in err
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
    # The 3 s start once this machine's own rank has joined (its start-up is not the other node's time).
    with pytest.raises(ClusterJoinError, match=r"ranks \[1\] did not join.*--node-rank.*MASTER_ADDR=127.0.0.1"):
        LLMEngine(EngineConfig(model=folder, nnodes=2, tensor_parallel_size=2, distributed_timeout_s=3, **FLAGS))
    assert not multiprocessing.active_children()


def test_several_nodes_need_the_rendezvous_settings(checkpoint_factory, monkeypatch):
    folder, _ = checkpoint_factory("llama")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(ValueError, match="MASTER_ADDR.*MASTER_PORT"):
        LLMEngine(EngineConfig(model=folder, nnodes=2, tensor_parallel_size=2, **FLAGS))


def test_several_nodes_need_a_cluster_key(checkpoint_factory, monkeypatch):
    folder, _ = checkpoint_factory("llama")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    for value in (None, "short"):
        if value is None:
            monkeypatch.delenv("ORCINUS_CLUSTER_KEY")
        else:
            monkeypatch.setenv("ORCINUS_CLUSTER_KEY", value)
        with pytest.raises(ConfigError, match="ORCINUS_CLUSTER_KEY"):
            LLMEngine(EngineConfig(model=folder, nnodes=2, tensor_parallel_size=2, **FLAGS))
    assert not multiprocessing.active_children()


def test_a_wrong_key_is_refused_and_the_right_node_still_joins(checkpoint_factory, monkeypatch, caplog):
    """The issue: a wrong-key node killed the engine's accept thread, so the right node could no
    longer join. Now the stranger (a raw socket sending junk) and the wrong-key launcher are
    refused and logged, the wrong-key launcher says so in one line, and the right node joins."""
    folder, _ = checkpoint_factory("llama")
    port = free_port()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    caplog.set_level(logging.WARNING, logger="orcinus.distributed.network")
    with ThreadPoolExecutor(1) as pool:
        engine_future = pool.submit(LLMEngine, EngineConfig(model=folder, nnodes=2, tensor_parallel_size=2,
                                                            distributed_timeout_s=300, **FLAGS))
        wrong = _launcher(folder, 2, 1, key="not-the-key-but-long-enough-0002")
        out, err = wrong.communicate(timeout=LAUNCHER_TIMEOUT_S)
        assert wrong.returncode == 2, err
        assert "refused this node's ORCINUS_CLUSTER_KEY" in err and "Traceback" not in err
        stranger = socket.create_connection(("127.0.0.1", port + 1))
        stranger.sendall(b"\x80\x04junk that is no handshake")
        stranger.close()
        right = _launcher(folder, 2, 1)
        try:
            engine = engine_future.result(timeout=LAUNCHER_TIMEOUT_S)
            got = _generate(engine)
            engine.shutdown()
            out, err = right.communicate(timeout=LAUNCHER_TIMEOUT_S)
        finally:
            if right.poll() is None:
                right.kill()
                right.wait()
    assert right.returncode == 0, err
    assert got == _generate(LLMEngine(EngineConfig(model=folder, **FLAGS)))
    refused = [r.getMessage() for r in caplog.records if "refused a connection" in r.getMessage()]
    assert any("does not hold this engine's ORCINUS_CLUSTER_KEY" in m for m in refused), refused
    assert not multiprocessing.active_children()


@pytest.mark.parametrize("case", ["bad node rank", "no engine", "no key"])
def test_launcher_errors_are_one_line(checkpoint_factory, monkeypatch, case):
    folder, _ = checkpoint_factory("llama")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    proc = _launcher(folder, 2, 1, node_rank="5" if case == "bad node rank" else "1",
                     key="" if case == "no key" else KEY, timeout_s=2)
    out, err = proc.communicate(timeout=LAUNCHER_TIMEOUT_S)
    assert proc.returncode == 2, err
    assert "Traceback" not in err
    expected = {"bad node rank": "--node-rank must be in 1 .. 1", "no engine": "nothing listens at 127.0.0.1",
                "no key": "ORCINUS_CLUSTER_KEY"}[case]
    assert expected in err
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1
