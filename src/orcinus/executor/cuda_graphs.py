"""CUDA graphs for increment-only iterations.

An iteration in which every request brings one token (all increments, the common case once
prompts are in) launches the same kernels every time, only over different data; at small batch
sizes the launches cost more than the work. Such a forward pass is captured once per batch size
in a set (`capture_sizes`, vLLM's shape: 1, 2, 4, then every multiple of 8 up to max_num_seqs)
and replayed: a batch of n requests runs the graph of the smallest captured size >= n, the rows
past n being padding.

Selective batching is untouched: an iteration with any prompt (chunk) in it, or with more
requests than the largest size, runs eagerly, exactly as without graphs.

How a replay stays correct:
- A graph reads fixed addresses, so its inputs live in `StaticBuffers` (one region per input,
  token ids, positions, KV slots, context lengths, block tables, ...). The runner fills them on
  the host with numpy and copies them with one host-to-device copy before the replay.
- Padding rows are requests of one token at position 0 whose KV slot is slot 0 of the padding
  block, a block the runner allocates past the engine's pool (`ModelRunner.allocate_kv_cache`);
  no engine request ever owns it, so padding never touches a real request's KV. Their hidden
  states are computed and dropped: only the real rows that sample are read out.
- Only the model's layers are captured; the LM head runs after the replay on the sampled rows,
  as in the eager path.
- The attention backend owns its part (orcinus/attention/backend.py): the static regions its
  metadata needs besides the common ones (`graph_buffers`), its metadata over them
  (`graph_metadata`), and whether its forward reads nothing but device tensors and shapes
  (`capturable`). The Triton backend is; the reference, batched and CPU paged backends loop over
  host values and are not, so with them the engine runs eagerly.

Graphs are off on CPU, with `enforce_eager` (vLLM's name), and with tensor or pipeline
parallelism (collectives and stage transfers are not captured here).
"""
from __future__ import annotations

import bisect
import logging
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from orcinus.attention.backend import AttentionBackend
from orcinus.attention.metadata import AttentionMetadata
from orcinus.attention.selector import BACKEND_NAMES, auto_backend_name, backend_class
from orcinus.config import EngineConfig
from orcinus.executor.host_staging import StaticBuffers

logger = logging.getLogger(__name__)


def capture_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, then multiples of 8, up to (and always including) max_num_seqs."""
    sizes = [s for s in (1, 2, 4) if s <= max_num_seqs] + list(range(8, max_num_seqs + 1, 8))
    if sizes[-1] != max_num_seqs:
        sizes.append(max_num_seqs)
    return sizes


def padded_size(sizes: list[int], n: int) -> int | None:
    """The smallest captured size >= n (sizes ascending); None when n is larger than all."""
    i = bisect.bisect_left(sizes, n)
    return sizes[i] if i < len(sizes) else None


@dataclass
class GraphPlan:
    enabled: bool
    sizes: list[int]
    reason: str = ""  # why they are off

    def describe(self) -> str:
        if self.enabled:
            return f"on (increment-only batches of {','.join(map(str, self.sizes))})"
        return f"off ({self.reason})"


def plan_cuda_graphs(config: EngineConfig, device: torch.device) -> GraphPlan:
    """Whether this engine captures CUDA graphs and for which batch sizes (from settings only,
    so the engine's start-up line and every worker agree)."""
    def off(reason: str) -> GraphPlan:
        return GraphPlan(False, [], reason)

    if config.enforce_eager:
        return off("enforce_eager")
    if device.type != "cuda":
        return off(f"device {device.type}: CUDA graphs need a CUDA device")
    if config.tensor_parallel_size > 1 or config.pipeline_parallel_size > 1:
        return off("tensor and pipeline parallel ranks run eagerly")
    backend = config.attention_backend
    if backend == "auto":
        backend = auto_backend_name(device)
    if not backend_class(backend).capturable:
        able = [n for n in BACKEND_NAMES if n != "auto" and backend_class(n).capturable]
        return off(f"attention backend {backend!r} cannot be captured; only {', '.join(able)} can")
    return GraphPlan(True, capture_sizes(config.max_num_seqs))


def fill_decode_inputs(host: dict[str, np.ndarray], padded: int, token_ids: np.ndarray, positions: np.ndarray,
                       slots: np.ndarray, seq_lens: np.ndarray, block_table: np.ndarray, sample_rows: np.ndarray,
                       padding_block: int, block_size: int) -> None:
    """Write n real increment rows and padded - n padding rows into the static host buffers.

    Real rows are copied as they are. A padding row is token 0 at position 0, writing its key and
    value to slot 0 of the padding block and attending over that one slot: it reads and writes
    nothing any request owns. Block-table columns past a row's context are never read, so what
    an earlier iteration left there stays."""
    n = len(token_ids)
    host["input_ids"][:n] = token_ids
    host["input_ids"][n:padded] = 0
    host["positions"][:n] = positions
    host["positions"][n:padded] = 0
    host["slot_mapping"][:n] = slots
    host["slot_mapping"][n:padded] = padding_block * block_size
    host["seq_lens"][:n] = seq_lens
    host["seq_lens"][n:padded] = 1
    host["block_tables"][:n, :block_table.shape[1]] = block_table
    host["block_tables"][n:padded, 0] = padding_block
    host["sample_indices"][:len(sample_rows)] = sample_rows


@dataclass
class DecodeInputs:
    """The static device tensors of one padded increment-only batch."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata  # the attention backend's, over the static buffers
    sample_indices: torch.Tensor
    padded: int


class DecodeGraphs:
    """The static input buffers of increment-only batches and, on CUDA, one graph per size."""

    def __init__(self, sizes: list[int], max_blocks_per_seq: int, block_size: int, padding_block: int,
                 device: torch.device, backend: AttentionBackend) -> None:
        self.backend = backend
        self.sizes = sorted(sizes)
        self.max_size = self.sizes[-1]
        self.block_size = block_size
        self.padding_block = padding_block
        self.device = device
        m, w = self.max_size, max(1, max_blocks_per_seq)
        self.buffers = StaticBuffers(device, [
            ("input_ids", np.int64, (m,)), ("positions", np.int64, (m,)), ("slot_mapping", np.int64, (m,)),
            ("sample_indices", np.int64, (m,)), ("seq_lens", np.int32, (m,)),
            ("query_start_loc", np.int32, (m + 1,)),
            *((b.name, b.dtype, (m + b.extra,)) for b in backend.graph_buffers()),
            ("block_tables", np.int64, (m, w)),  # last: a batch of B rows copies only its B rows of it
        ])
        host = self.buffers.host
        host["query_start_loc"][:] = np.arange(m + 1)  # one token per row: row i's query starts at i
        for b in backend.graph_buffers():
            host[b.name][:] = b.fill(m + b.extra)
        for name in ("input_ids", "positions", "slot_mapping", "sample_indices", "seq_lens"):
            host[name][:] = 0
        host["seq_lens"][:] = 1
        host["block_tables"][:] = padding_block
        self.buffers.upload()
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.memory_bytes = 0
        self._pool = None

    def padded_size(self, query_lens: np.ndarray, table_width: int = 1) -> int | None:
        """The graph size for this batch, or None when it must run eagerly (a prompt in it, more
        requests than the largest size, or a block table wider than the static one)."""
        if len(query_lens) == 0 or not bool((query_lens == 1).all()):
            return None
        if table_width > self.buffers.host["block_tables"].shape[1]:
            return None
        return padded_size(self.sizes, len(query_lens))

    def prepare(self, padded: int, token_ids: np.ndarray, positions: np.ndarray, slots: np.ndarray,
                seq_lens: np.ndarray, block_table: np.ndarray, sample_rows: np.ndarray) -> DecodeInputs:
        buf = self.buffers
        buf.wait_host_free()
        fill_decode_inputs(buf.host, padded, token_ids, positions, slots, seq_lens, block_table, sample_rows,
                           self.padding_block, self.block_size)
        width = buf.host["block_tables"].shape[1]
        buf.upload(buf.offsets["block_tables"] + padded * width * 8)  # one copy, up to row `padded`
        return self._inputs(padded, len(sample_rows), np.concatenate([seq_lens, np.ones(padded - len(seq_lens),
                                                                                        dtype=np.int64)]))

    def _inputs(self, padded: int, num_samples: int, seq_lens: np.ndarray) -> DecodeInputs:
        dev = self.buffers.dev
        meta = self.backend.graph_metadata(dev, padded, seq_lens, self.block_size)
        return DecodeInputs(dev["input_ids"][:padded], dev["positions"][:padded], meta,
                            dev["sample_indices"][:num_samples], padded)

    # ------------------------------------------------------------------ CUDA only
    def capture(self, forward: Callable[[DecodeInputs], torch.Tensor]) -> None:
        """Capture `forward` (the model's layers over static inputs) for every size, largest
        first so that the smaller graphs reuse its memory pool."""
        free_before = torch.cuda.mem_get_info(self.device)[0]
        started = time.monotonic()
        logger.info("capturing CUDA graphs for increment-only batches of %s requests", self.sizes)
        for size in reversed(self.sizes):
            inputs = self._inputs(size, 0, np.ones(size, dtype=np.int64))  # all padding rows
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):  # compiles Triton kernels, sets up cuBLAS workspaces
                    forward(inputs)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                out = forward(inputs)
            self._pool = graph.pool()
            self.graphs[size] = (graph, out)
        torch.cuda.synchronize(self.device)
        self.memory_bytes = max(0, free_before - torch.cuda.mem_get_info(self.device)[0])
        logger.info("captured %d CUDA graphs in %.1f s, %.1f MiB of GPU memory", len(self.graphs),
                    time.monotonic() - started, self.memory_bytes / 2**20)

    def replay(self, padded: int) -> torch.Tensor:
        """Run the captured graph; its output (the [padded, hidden] states) is overwritten by
        the next replay, so the caller reads it before then."""
        graph, out = self.graphs[padded]
        graph.replay()
        return out
