"""CUDA graphs, the parts that run without a GPU: which sizes are captured, which batches replay
(and padded to what), what padding rows look like, that a padded increment-only forward over the
static buffers gives the unpadded batch's logits and touches only the padding block besides the
batch's own slots, and that graphs are off (and said to be) on CPU and with --enforce-eager.
The capture and replay themselves are in the gpu tier (test_cuda_graphs_gpu.py)."""
from __future__ import annotations

import logging
import os
import subprocess
import sys

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from orcinus.attention.backend import GraphBuffer
from orcinus.attention.metadata import AttentionMetadata
from orcinus.attention.reference import ReferenceAttention
from orcinus.cli import build_parser, engine_config_from_args
from orcinus.config import EngineConfig
from orcinus.executor.cuda_graphs import (DecodeGraphs, GraphPlan, capture_sizes, fill_decode_inputs, padded_size,
                                          plan_cuda_graphs)
from orcinus.executor.messages import BatchMessage, CachedRequestData, NewRequestData, SamplingSettings
from orcinus.executor.worker import Worker

GREEDY = SamplingSettings(temperature=0.0)
CUDA = torch.device("cuda")  # only its type is read: planning needs no GPU
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_capture_sizes_follow_vllms_shape_up_to_max_num_seqs():
    assert capture_sizes(32) == [1, 2, 4, 8, 16, 24, 32]
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert capture_sizes(5) == [1, 2, 4, 5]
    assert capture_sizes(1) == [1]


def test_a_batch_replays_the_smallest_size_that_holds_it():
    sizes = capture_sizes(32)
    assert [padded_size(sizes, n) for n in (1, 2, 3, 5, 8, 9, 17, 25, 32)] == [1, 2, 4, 8, 8, 16, 24, 32, 32]
    assert padded_size(sizes, 33) is None


def test_only_increment_only_batches_within_the_largest_size_replay():
    graphs = DecodeGraphs([1, 2, 4], max_blocks_per_seq=3, block_size=4, padding_block=9, device=torch.device("cpu"),
                          backend=ReferenceAttention())
    assert graphs.padded_size(np.array([1, 1, 1])) == 4
    assert graphs.padded_size(np.array([1, 5, 1])) is None  # a prompt chunk: eager (selective batching)
    assert graphs.padded_size(np.array([1] * 5)) is None  # more than the largest size: eager
    assert graphs.padded_size(np.array([], dtype=np.int64)) is None
    assert graphs.padded_size(np.array([1, 1]), table_width=3) == 2
    assert graphs.padded_size(np.array([1, 1]), table_width=4) is None  # wider than max_model_len allows


def test_plan_is_off_on_cpu_with_enforce_eager_parallel_ranks_and_uncapturable_backends():
    cfg = EngineConfig(max_num_seqs=20, attention_backend="triton")
    assert plan_cuda_graphs(cfg, torch.device("cpu")).enabled is False
    assert "CUDA device" in plan_cuda_graphs(cfg, torch.device("cpu")).describe()
    plan = plan_cuda_graphs(cfg, CUDA)
    assert plan.enabled and plan.sizes == [1, 2, 4, 8, 16, 20]
    assert plan.describe() == "on (increment-only batches of 1,2,4,8,16,20)"
    assert plan_cuda_graphs(EngineConfig(attention_backend="triton", enforce_eager=True), CUDA).describe() \
        == "off (enforce_eager)"
    assert not plan_cuda_graphs(EngineConfig(attention_backend="triton", tensor_parallel_size=2), CUDA).enabled
    off = plan_cuda_graphs(EngineConfig(attention_backend="batched"), CUDA)
    assert not off.enabled and "'batched' cannot be captured" in off.reason


def test_padding_rows_map_to_the_padding_block_and_real_rows_are_copied_unchanged():
    graphs = DecodeGraphs([1, 2, 4, 8], max_blocks_per_seq=4, block_size=4, padding_block=11,
                          device=torch.device("cpu"), backend=ReferenceAttention())
    host = graphs.buffers.host
    host["block_tables"][:] = 77  # what an earlier iteration left
    table = np.array([[3, 5, 0], [6, 7, 8], [2, 0, 0]])
    fill_decode_inputs(host, 4, np.array([10, 20, 30]), np.array([5, 9, 0]), np.array([21, 32, 8]),
                       np.array([6, 10, 1]), table, np.array([0, 2]), padding_block=11, block_size=4)
    assert host["input_ids"][:4].tolist() == [10, 20, 30, 0]
    assert host["positions"][:4].tolist() == [5, 9, 0, 0]
    assert host["slot_mapping"][:4].tolist() == [21, 32, 8, 44]  # padding: slot 0 of block 11
    assert host["seq_lens"][:4].tolist() == [6, 10, 1, 1]
    assert host["block_tables"][:3, :3].tolist() == table.tolist()
    assert host["block_tables"][3, 0] == 11
    assert host["block_tables"][4:].tolist() == [[77] * 4] * 4  # rows past the padded size: not written
    assert host["sample_indices"][:2].tolist() == [0, 2]


def test_the_static_triton_metadata_is_what_the_backend_builds_for_the_same_decode_batch():
    """The graphs' constant regions (query starts, one-token tiles) stand in for what the Triton
    backend's own `build` computes; if its tiling of decodes changed, this says so."""
    pytest.importorskip("triton", reason="triton is in the `test` extra; install it to run this test")
    from orcinus.attention.metadata import BatchLayout
    from orcinus.attention.triton_paged import TritonPagedAttention
    from orcinus.executor.host_staging import zero_copy_upload

    graphs = DecodeGraphs([1, 2, 4, 8], max_blocks_per_seq=6, block_size=4, padding_block=50,
                          device=torch.device("cpu"), backend=TritonPagedAttention())
    seq_lens = np.array([3, 17, 9, 1, 24])
    table = np.arange(5 * 6).reshape(5, 6)
    slots = table[np.arange(5), (seq_lens - 1) // 4] * 4 + (seq_lens - 1) % 4
    padded = graphs.padded_size(np.ones(5, dtype=np.int64), table.shape[1])
    static = graphs.prepare(padded, np.arange(5), seq_lens - 1, slots, seq_lens, table, np.arange(5)).meta
    layout = BatchLayout(np.ones(8, dtype=np.int64), np.concatenate([seq_lens, [1, 1, 1]]),
                         np.vstack([table, np.full((3, 6), 50)]), np.concatenate([slots, [200, 200, 200]]), 4)
    built = TritonPagedAttention().build(layout, zero_copy_upload)
    assert static.block_m == built.block_m == 1
    for name in ("query_start_loc", "seq_lens", "slot_mapping", "tile_req", "tile_start"):
        assert torch.equal(getattr(static, name), getattr(built, name)), name
    assert torch.equal(static.block_tables[:5], built.block_tables[:5])
    assert (static.block_tables[5:, 0] == 50).all()


@dataclass
class MarkedMetadata(AttentionMetadata):
    row_marks: torch.Tensor  # this backend's own static region


class MarkingBackend(ReferenceAttention):
    """A backend that owns a static region of its own (row i holds 7 * i) and checks, at every
    attention call, that its graph metadata reads it: the hooks' contract, on CPU."""

    name = "marking"
    calls = 0

    def graph_buffers(self) -> list[GraphBuffer]:
        return [GraphBuffer("row_marks", np.int64, extra=1, fill=lambda n: 7 * np.arange(n))]

    def graph_metadata(self, static, rows, seq_lens, block_size) -> MarkedMetadata:
        common = super().graph_metadata(static, rows, seq_lens, block_size)
        return MarkedMetadata(**vars(common), row_marks=static["row_marks"][:rows + 1])

    def attend(self, q, k_cache, v_cache, meta, scale, sliding_window=None):
        if isinstance(meta, MarkedMetadata):
            assert meta.row_marks.tolist() == [7 * i for i in range(q.shape[0] + 1)]
            MarkingBackend.calls += 1
        return super().attend(q, k_cache, v_cache, meta, scale, sliding_window)


def test_a_backend_owns_its_graph_buffers_and_metadata(checkpoint_factory):
    """DecodeGraphs allocates and fills the backend's own static region and runs the forward over
    the metadata the backend builds: the padded increment batch still gives the eager logits."""
    folder, _ = checkpoint_factory("qwen3")
    worker = _worker(folder, "reference", [1, 2, 4, 8])
    worker.runner.backend = backend = MarkingBackend()
    worker.runner.graphs = DecodeGraphs([1, 2, 4, 8], worker.runner.max_blocks_per_seq, 4, padding_block=40,
                                        device=torch.device("cpu"), backend=backend)
    assert worker.runner.graphs.buffers.host["row_marks"].tolist() == [7 * i for i in range(9)]
    tokens = _prefill(worker, [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14], [15, 16]])
    msg = BatchMessage(1, [CachedRequestData(f"r{i}", t) for i, t in enumerate(tokens)])
    MarkingBackend.calls = 0
    eager, padded, _, _, inp = _padded_vs_eager(worker, msg)
    assert inp.padded == 8 and isinstance(inp.meta, MarkedMetadata)
    assert MarkingBackend.calls == worker.model_config.num_layers  # every layer of the padded forward
    torch.testing.assert_close(padded, eager, rtol=1e-5, atol=1e-5)


def test_capturability_is_the_backends_own_claim():
    from orcinus.attention.selector import BACKEND_NAMES, backend_class

    assert [n for n in BACKEND_NAMES if n != "auto" and backend_class(n).capturable] == ["triton"]


def _worker(folder: str, backend: str, sizes: list[int]) -> Worker:
    """A CPU worker whose runner pads increment-only batches as CUDA graphs do (the padding block
    allocated, the static buffers in place) and runs them eagerly: nothing is captured on CPU."""
    worker = Worker(EngineConfig(model=folder, dtype="float32", kv_cache_memory=1 << 20, block_size=4,
                                 attention_backend=backend, max_num_seqs=max(sizes)))
    runner = worker.runner
    runner.graph_plan = GraphPlan(True, sizes)
    worker.initialize_kv_cache(40)
    for k, v in runner.kv_caches:  # no NaN garbage, so that "unchanged" is checkable
        k.zero_()
        v.zero_()
    assert runner.graphs is None  # capture_cuda_graphs does nothing without CUDA
    runner.graphs = DecodeGraphs(sizes, runner.max_blocks_per_seq, runner.block_size, padding_block=40,
                                 device=torch.device("cpu"), backend=runner.backend)
    return worker


def _prefill(worker: Worker, prompts: list[list[int]]) -> list[int]:
    rows, blocks = [], 0
    for i, p in enumerate(prompts):
        n = -(-(len(p) + 8) // 4)
        rows.append(NewRequestData(f"r{i}", p, GREEDY, list(range(blocks, blocks + n))))
        blocks += n
    return worker.execute(BatchMessage(0, rows)).token_ids


def _padded_vs_eager(worker: Worker, msg: BatchMessage) -> tuple[torch.Tensor, torch.Tensor, list, list, object]:
    runner = worker.runner
    rows, undo = worker.states.apply(msg)
    before = [(k.clone(), v.clone()) for k, v in runner.kv_caches]
    graphs, runner.graphs = runner.graphs, None
    eager = runner.forward_logits(runner.prepare(rows))
    kv_eager = [(k.clone(), v.clone()) for k, v in runner.kv_caches]
    for (k, v), (k0, v0) in zip(runner.kv_caches, before):
        k.copy_(k0)
        v.copy_(v0)
    runner.graphs = graphs
    inp = runner.prepare(rows)
    padded = runner.forward_logits(inp)
    worker.states.rollback(undo)
    return eager, padded, kv_eager, before, inp


@pytest.mark.parametrize("n", [3, 5])  # padded to 4 and to 8
def test_a_padded_increment_batch_gives_the_unpadded_logits_and_writes_only_the_padding_block(n, checkpoint_factory):
    folder, _ = checkpoint_factory("llama")
    worker = _worker(folder, "reference", [1, 2, 4, 8])
    g = torch.Generator().manual_seed(n)
    prompts = [torch.randint(3, 300, (int(k),), generator=g).tolist() for k in torch.randint(2, 9, (n,), generator=g)]
    tokens = _prefill(worker, prompts)
    msg = BatchMessage(1, [CachedRequestData(f"r{i}", t) for i, t in enumerate(tokens)])
    eager, padded, kv_eager, before, inp = _padded_vs_eager(worker, msg)
    assert inp.padded == (4 if n == 3 else 8) and inp.input_ids.shape[0] == inp.padded
    assert padded.shape == eager.shape == (n, worker.model_config.vocab_size)  # padding rows dropped
    # GEMMs over 4 or 8 rows instead of 3 or 5 may round differently in the last bits
    torch.testing.assert_close(padded, eager, rtol=1e-5, atol=1e-5)
    assert_only_own_slots_and_padding_written(worker.runner.kv_caches, kv_eager, before)


def assert_only_own_slots_and_padding_written(kv, kv_eager, before, pool_blocks: int = 40) -> None:
    """The pool's blocks hold what the eager run wrote, and nothing else changed in them; the
    padding block (index pool_blocks) was written."""
    for (k, v), (ke, ve), (k0, v0) in zip(kv, kv_eager, before):
        for got, want, old in ((k, ke, k0), (v, ve, v0)):
            written = want[:pool_blocks] != old[:pool_blocks]
            assert written.any()
            assert torch.equal(got[:pool_blocks][~written], old[:pool_blocks][~written])
            torch.testing.assert_close(got[:pool_blocks], want[:pool_blocks], rtol=1e-5, atol=1e-5)
            assert not torch.equal(got[pool_blocks, 0], old[pool_blocks, 0])


def test_a_mixed_batch_runs_eagerly_with_graphs_on(checkpoint_factory):
    folder, _ = checkpoint_factory("llama")
    worker = _worker(folder, "reference", [1, 2, 4])
    tokens = _prefill(worker, [[5, 6, 7], [8, 9]])
    msg = BatchMessage(1, [CachedRequestData("r0", tokens[0]), NewRequestData("r2", [3, 4, 5], GREEDY, [30, 31])])
    rows, undo = worker.states.apply(msg)
    inp = worker.runner.prepare(rows)
    assert inp.padded is None and inp.input_ids.shape[0] == 4  # flat and unpadded: 1 + 3 tokens
    worker.states.rollback(undo)


def test_triton_kernel_over_padded_static_buffers_matches_eager_under_the_interpreter(checkpoint_factory):
    """The Triton backend is the one graphs capture: its kernel, reading the static buffers
    (a block table as wide as max_model_len allows, padding rows), under Triton's interpreter."""
    pytest.importorskip("triton", reason="triton is in the `test` extra; install it to run this test")
    folder, _ = checkpoint_factory("mistral")  # GQA and a sliding window (24, passed below)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "src"),
                                                                             os.path.dirname(__file__)]))
    proc = subprocess.run([sys.executable, "-c", INTERPRETED, folder], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.split() == ["padded-to-4", "padded-to-8"]


INTERPRETED = """
import sys, torch
torch.set_num_threads(1)
from test_cuda_graphs import _worker, _prefill, _padded_vs_eager, assert_only_own_slots_and_padding_written
from orcinus.executor.messages import BatchMessage, CachedRequestData
for n in (3, 5):
    worker = _worker(sys.argv[1], "triton", [1, 2, 4, 8])
    prompts = [[3 + i] * (20 + i) for i in range(n)]  # 21 to 25 tokens after decoding: past the window of 24
    tokens = _prefill(worker, prompts)
    eager, padded, kv_eager, before, inp = _padded_vs_eager(
        worker, BatchMessage(1, [CachedRequestData(f"r{i}", t) for i, t in enumerate(tokens)]))
    torch.testing.assert_close(padded, eager, rtol=1e-5, atol=1e-5)
    assert_only_own_slots_and_padding_written(worker.runner.kv_caches, kv_eager, before)
    print(f"padded-to-{inp.padded}")
"""


@pytest.mark.parametrize("command", ["serve", "generate"])
def test_enforce_eager_is_an_engine_flag(command, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    assert "--enforce-eager" in capsys.readouterr().out
    extra = ["--prompt", "x"] if command == "generate" else []
    args = build_parser().parse_args([command, "--enforce-eager", *extra])
    assert engine_config_from_args(args).enforce_eager is True
    assert engine_config_from_args(build_parser().parse_args([command, *extra])).enforce_eager is False


def test_the_start_up_line_says_cuda_graphs_are_off_on_cpu(checkpoint_factory, caplog):
    from orcinus.engine.llm_engine import LLMEngine

    folder, _ = checkpoint_factory("llama")
    with caplog.at_level(logging.INFO, logger="orcinus.engine.llm_engine"):
        engine = LLMEngine.from_kwargs(model=folder, skip_tokenizer_init=True, dtype="float32", device="cpu",
                                       kv_cache_memory=1 << 20)
    assert "cuda_graphs=off (device cpu: CUDA graphs need a CUDA device)" in caplog.text
    assert engine.executor.driver_worker.runner.graphs is None
