"""An executor that runs no model: it implements the engine <-> worker contract
(`Executor.execute_async(BatchMessage) -> Future[SamplerOutput]`), keeps per request what a worker
would (tokens known, tokens computed), prices each iteration with the cost model and returns a
token per sampling row whose future, when waited on, moves the virtual clock to the iteration's
end. The engine, its schedulers, KV accounting and in-flight pipelining run unchanged on top.

Tokens: EOS at the output length `lengths` gives a request (a dict of request id -> length, or a
callable), otherwise a filler id that is never an EOS id (a request then ends by max_tokens)."""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Callable, Mapping

from orcinus.config import ModelConfig
from orcinus.executor.executor import Executor
from orcinus.executor.messages import BatchMessage, NewRequestData, SamplerOutput, WorkerInfo
from orcinus.sim.clock import PipelineTimeline, VirtualClock, VirtualFuture
from orcinus.sim.cost_model import BatchShape, CostModel

LengthOracle = Mapping[str, int] | Callable[[str], int | None]


@dataclass
class _Req:
    prompt_len: int
    num_tokens: int  # prompt + outputs the worker knows
    computed: int
    logprobs: int | None


class RowTracker:
    """What a worker knows of each request, kept from the messages alone: (new tokens, tokens
    already computed, samples) per row, and which output token each sampling row produces."""

    def __init__(self) -> None:
        self._reqs: dict[str, _Req] = {}

    def clear(self) -> None:
        self._reqs.clear()

    def rows(self, msg: BatchMessage) -> tuple[list[tuple[int, int, bool]], list[tuple[str, int, bool]]]:
        reqs = self._reqs
        for rid in msg.finished_ids:
            reqs.pop(rid, None)
        for rid in msg.preempted_ids:
            reqs.pop(rid, None)
        rows: list[tuple[int, int, bool]] = []
        sampled: list[tuple[str, int, bool]] = []
        for entry in msg.requests:
            rid = entry.request_id
            if isinstance(entry, NewRequestData):
                known = len(entry.prompt_token_ids) + len(entry.output_token_ids)
                st = _Req(len(entry.prompt_token_ids), known, entry.num_computed_tokens, entry.settings.logprobs)
                reqs[rid] = st
                n = entry.num_new_tokens if entry.num_new_tokens is not None else known - st.computed
            else:
                st = reqs[rid]
                if entry.new_token_id is not None:
                    st.num_tokens += 1
                n = entry.num_new_tokens
            rows.append((n, st.computed, entry.samples))
            st.computed += n
            if entry.samples:
                sampled.append((rid, st.num_tokens - st.prompt_len + 1, st.logprobs is not None))
        return rows, sampled


@dataclass
class SimStats:
    iterations: int = 0
    busy_s: float = 0.0  # sum of iteration compute time on the busiest stage
    overhead_s: float = 0.0  # the engine's own time (control plane)
    tokens: int = 0
    rows: int = 0
    per_iteration: list[tuple[float, int, int, float]] | None = field(default=None)  # (launch, rows, tokens, s)


class SimulatedExecutor(Executor):
    def __init__(self, model_config: ModelConfig, num_blocks: int, cost: CostModel, clock: VirtualClock,
                 lengths: LengthOracle | None = None, model_path: str = "simulated",
                 record_iterations: bool = False, pad_static: bool = False, dtype: str = "float16") -> None:
        self._model_config, self._model_path = model_config, model_path
        self.num_blocks = num_blocks
        # What a worker would report when ready; the engine reads its device and dtype from here.
        self.info = WorkerInfo(num_blocks, model_config, model_path, device="cpu", dtype=dtype,
                               dtype_note=" (simulated)", cuda_graphs="off (simulated executor)")
        self.cost, self.clock = cost, clock
        self.overhead = cost.hw.overhead
        self.timeline = PipelineTimeline(cost.par.pp)
        self._lengths = lengths
        self._eos = model_config.eos_token_ids[0] if model_config.eos_token_ids else None
        self._eos_set = frozenset(model_config.eos_token_ids)
        self.tracker = RowTracker()
        self.stats = SimStats(per_iteration=[] if record_iterations else None)
        self._seq = 0
        # FasterTransformer-style padding (with the static policy): a batch's prompts are padded to
        # its longest and every member computes until the longest output is done.
        self.pad_static = pad_static
        self._cohort = (0, 0)  # (members, padded context) of the static batch running

    @property
    def model_config(self) -> ModelConfig:
        return self._model_config

    @property
    def model_path(self) -> str:
        return self._model_path

    def _target_length(self, rid: str) -> int | None:
        if self._lengths is None:
            return None
        if callable(self._lengths):
            return self._lengths(rid)
        return self._lengths.get(rid)

    def _filler(self, rid: str, k: int) -> int:
        vocab = self.model_config.vocab_size
        tok = (zlib.crc32(rid.encode()) + 7919 * k) % vocab
        while tok in self._eos_set:
            tok = (tok + 1) % vocab
        return tok

    def execute_async(self, msg: BatchMessage) -> VirtualFuture[SamplerOutput]:
        self._seq += 1
        msg.seq = self._seq
        rows, sampled = self.tracker.rows(msg)
        tokens: list[int] = []
        logprobs: list[float] = []
        tops: list[dict | None] = []
        for rid, k, want_logprobs in sampled:  # the request's k-th output token
            target = self._target_length(rid)
            tok = self._eos if target is not None and k >= target and self._eos is not None else self._filler(rid, k)
            tokens.append(tok)
            logprobs.append(0.0)
            tops.append({tok: 0.0} if want_logprobs else None)
        out = SamplerOutput(tokens, logprobs, tops)
        if not rows:  # a drops-only message: no iteration
            return VirtualFuture(self.clock, self.clock.now, out)
        shape = self._padded(rows) if self.pad_static else BatchShape.of(rows)
        overhead = self.overhead.seconds(shape.rows, shape.tokens)
        self.clock.advance(overhead)  # the engine's own work before this launch
        stages = self.cost.stage_seconds(shape)
        launch = self.clock.now
        done = self.timeline.run(launch, stages)
        s = self.stats
        s.iterations += 1
        s.busy_s += max(c for c, _ in stages)
        s.overhead_s += overhead
        s.tokens += shape.tokens
        s.rows += shape.rows
        if s.per_iteration is not None:
            s.per_iteration.append((launch, shape.rows, shape.tokens, done - launch))
        return VirtualFuture(self.clock, done, out)

    def _padded(self, rows: list[tuple[int, int, bool]]) -> BatchShape:
        if all(c == 0 for _, c, _ in rows):  # a new static batch's prompts
            width = max(n for n, _, _ in rows)
            self._cohort = (len(rows), width)
            return BatchShape.of([(width, 0, True)] * len(rows))
        members, ctx = self._cohort
        members = max(members, len(rows))
        self._cohort = (members, ctx + 1)
        return BatchShape.of([(1, ctx, True)] * members)

    def shutdown(self) -> None:
        self.tracker.clear()
