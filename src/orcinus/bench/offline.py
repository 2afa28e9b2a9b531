"""`orcinus bench offline`: one trace, every system, output tokens/s side by side.

All backends get the same trace (all requests at once, EOS ignored), model, dtype and device, run
one after another in this process. Each is warmed up before its timed run with the trace's longest
prompts (reversed, so the prefix cache gains nothing), so first-call costs (allocation, kernel
compilation and selection at the shapes the run uses) do not count against it. Process CPU time is
recorded beside wall time: on a shared machine it moves less with other people's load.

The report gives measured ratios and, beside them, the bound the trace itself puts on orca's gain
over a static policy (iterations at a fixed cost per iteration); it warns when a timed run is too
short for its ratio to mean much.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from orcinus.bench.budgets import unchunked_budget
from orcinus.bench.floor import DeviceRates, Floor, ModelDims, measure_device, static_batch_iterations, trace_floor
from orcinus.bench.own_thread import on_own_thread
from orcinus.bench.profile import profile_phases
from orcinus.bench.report import fmt, markdown_table
from orcinus.bench.workloads import BenchRequest
from orcinus.config import EngineConfig
from orcinus.executor.platform import resolve_device, resolve_for_config

logger = logging.getLogger(__name__)

BACKENDS: tuple[str, ...] = ("orca", "static", "hf", "hf-cb", "paged", "paged-chunked", "orca-chunked",
                             "vllm", "llama-cpp")  # the last two: other engines, in processes of their own (peers.py)
PEER_BACKENDS = ("vllm", "llama-cpp")
DEFAULT_BACKENDS: tuple[str, ...] = ("orca", "static", "hf", "hf-cb")
ORCINUS_BACKENDS = ("orca", "static", "paged", "paged-chunked", "orca-chunked")
# budget of the *-chunked backends when --max-num-batched-tokens gives none
CHUNKED_BUDGET = 512
BACKEND_LABELS = {
    "orca": "orcinus, orca policy",
    "static": "orcinus, static policy",
    "paged": "orcinus, paged policy",
    "paged-chunked": "orcinus, paged policy, chunked prefill",
    "orca-chunked": "orcinus, orca policy, chunked prefill",
    "hf": "transformers generate, static batches",
    "hf-cb": "transformers continuous batching",
    "vllm": "vLLM offline LLM (CPU build), own process",
    "llama-cpp": "llama.cpp via llama_cpp.Llama, own process, one request at a time",
}
# Ratios reported: orca against transformers' static batches, and against orcinus' static policy.
RATIOS = (("orca", "hf"), ("orca", "static"), ("orca", "vllm"), ("paged", "vllm"), ("orca", "llama-cpp"),
          ("paged", "llama-cpp"))
# A timed run shorter than this is mostly noise (scheduling jitter, timer, other load).
MIN_COMPARABLE_S = 5.0
# Warm-up: this many requests of the trace (its longest prompts, whole), a few output tokens each,
# before each timed run.
WARMUP_REQUESTS = 4
WARMUP_OUTPUT_TOKENS = 4


@dataclass
class BackendResult:
    backend: str
    status: str = "ok"  # "ok", "n/a: why" or "error: what"
    elapsed_s: float = math.nan
    cpu_s: float = math.nan
    output_tokens: int = 0  # useful tokens: what the requests asked for
    load_s: float = math.nan
    kv: dict | None = None  # orcinus only: KVUsageSummary of the timed run
    kv_samples: list | None = None  # orcinus only: per-iteration KVSample dicts
    profile: dict | None = None  # per-phase seconds of the timed run (--profile)
    single: dict | None = None  # --mode single: TTFT and ms per output token (single_stream.summarize)
    peer: dict | None = None  # peer backends: their version and settings
    # orcinus backends with known lengths: per request, (finish - arrival) / output tokens, in ms
    median_normalized_latency_ms: float = math.nan
    p90_normalized_latency_ms: float = math.nan

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.elapsed_s if self.ok and self.elapsed_s > 0 else math.nan


@dataclass
class OfflineReport:
    settings: dict
    trace: dict
    machine: dict
    command: str
    results: list[BackendResult] = field(default_factory=list)
    floor: dict | None = None
    # filled at the end of a run, for the JSON report: "orca/static" -> measured ratio, and why
    # the numbers may not compare
    ratios: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def result(self, backend: str) -> BackendResult | None:
        return next((r for r in self.results if r.backend == backend), None)

    def best_baseline(self) -> BackendResult | None:
        """The fastest backend that is not orcinus' orca policy."""
        base = [r for r in self.results if r.backend != "orca" and r.ok]
        return max(base, key=lambda r: r.output_tokens_per_s, default=None)

    def ratio(self, a: str, b: str) -> float:
        ra, rb = self.result(a), self.result(b)
        if ra is None or rb is None or not (ra.ok and rb.ok):
            return math.nan
        return ra.output_tokens_per_s / rb.output_tokens_per_s

    def static_bound(self) -> float | None:
        """Request-level over iteration-level iteration counts of the trace: the most orca can gain
        over a static policy that does not pad when every iteration costs the same."""
        if not self.floor or not self.floor.get("static_batch_iterations"):
            return None
        return self.floor["static_batch_iterations"] / self.floor["num_iterations"]

    def warnings(self) -> list[str]:
        short = [r for r in self.results if r.ok and r.elapsed_s < MIN_COMPARABLE_S]
        if not short:
            return []
        names = ", ".join(f"{r.backend} {fmt(r.elapsed_s, 2)} s" for r in short)
        return [f"timed runs shorter than {MIN_COMPARABLE_S:.0f} s ({names}) are too short to compare: "
                "the ratios above are mostly noise; use more requests (--num-requests) or longer outputs"]

    def to_markdown(self) -> str:
        best = self.best_baseline()
        floor_s = self.floor["seconds"] if self.floor else None
        rows = []
        for r in self.results:
            vs_best = r.output_tokens_per_s / best.output_tokens_per_s if best and r.ok else math.nan
            of_floor = 100.0 * floor_s / r.elapsed_s if floor_s and r.ok else math.nan
            rows.append([f"{r.backend} ({BACKEND_LABELS.get(r.backend, r.backend)})", r.status,
                         r.output_tokens_per_s, vs_best, r.elapsed_s, r.cpu_s, of_floor])
        headers = ["backend", "status", "output tok/s", f"× best baseline ({best.backend if best else 'n/a'})",
                   "wall s", "CPU s", "% of floor"]
        text = markdown_table(headers, rows)
        kv_rows = [[r.backend, r.kv["mean_running"], 100.0 * r.kv["mean_utilisation"],
                    100.0 * r.kv["mean_allocated_fraction"], r.kv["preemptions"], 100.0 * r.kv["prefix_cache_hit_rate"],
                    r.kv.get("prompt_tokens_computed"), r.kv.get("tokens_computed")]
                   for r in self.results if r.kv]
        if kv_rows:
            text += "\n\n" + markdown_table(["backend", "mean running seqs", "KV utilisation % (real / allocated)",
                                              "allocated % of pool", "preemptions", "prefix-cache hit %",
                                              "prompt tokens computed", "tokens computed"], kv_rows)
        bound = self.static_bound()
        checks = []
        for a, b in RATIOS:
            if self.result(a) and self.result(b):
                line = f"{a} / {b}: {fmt(self.ratio(a, b))}× measured"
                if b == "static" and bound is not None:
                    line += f" (bound at a fixed cost per iteration: ≤ {fmt(bound)}×)"
                checks.append(line)
        if checks:
            text += "\n\n" + "; ".join(checks)
        warnings = self.warnings()
        if warnings:
            text += "\n\n" + "\n".join(f"warning: {w}" for w in warnings)
        if self.floor:
            text += (f"\n\nFloor ({self.floor['rates']['label']}): {fmt(self.floor['seconds'], 3)} s = "
                     f"{fmt(self.floor['output_tokens_per_s'], 1)} output tok/s over {self.floor['num_iterations']} "
                     f"ideal iterations (memory-bound part {fmt(self.floor['memory_seconds'], 3)} s, compute-bound "
                     f"part {fmt(self.floor['compute_seconds'], 3)} s; copy bandwidth "
                     f"{fmt(self.floor['rates']['copy_bandwidth'] / 1e9, 1)} GB/s, matmul "
                     f"{fmt(self.floor['rates']['matmul_flops'] / 1e9, 1)} GFLOP/s)")
            its, static_its = self.floor["num_iterations"], self.floor.get("static_batch_iterations")
            if static_its:
                text += (f"\n\nIterations: {its} iteration-level, {static_its} request-level (batches of "
                         f"max_num_seqs): at a fixed cost per iteration, orca can beat a static policy that "
                         f"does not pad by at most {fmt(static_its / its)}×")
        from orcinus.bench.single_stream import single_stream_table

        single = single_stream_table(self.results)
        if single:
            text += "\n\nOne request at a time (time to first token, ms per output token after it):\n\n" + single
        for r in self.results:
            if r.profile:
                text += f"\n\nPer-iteration breakdown, {r.backend}:\n\n{r.profile['markdown']}"
        return text


def set_normalized_latency(res: BackendResult, latencies: Sequence[tuple[float, int]]) -> None:
    """The median and p90 of (seconds, output tokens) per request as ms per token, the Orca paper's
    normalized latency (every request arrives at the start here)."""
    from orcinus.bench.metrics import Stats

    values = [s / n for s, n in latencies if n > 0]
    if values:
        st = Stats.of(values, 1000.0)
        res.median_normalized_latency_ms, res.p90_normalized_latency_ms = st.median, st.p90


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _timed(fn, *args, **kwargs) -> tuple[object, float, float]:
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0, time.process_time() - c0


def _warmup_requests(trace: Sequence[BenchRequest]) -> list[BenchRequest]:
    """The trace's longest prompts, whole, with a few output tokens each: the warm-up then runs
    prefills and decodes of the shapes the timed run will (full-length prompts, wide block tables,
    the largest prefill tiles), so that kernels specialised by shape (Triton's BLOCK_M, cuBLAS's
    algorithm choice) are compiled and chosen before the clock starts, not inside the timed run."""
    longest = sorted(trace, key=lambda r: r.prompt_len, reverse=True)[:WARMUP_REQUESTS]
    # Reversed: the same lengths, but no prefix any timed request shares, so the prefix cache holds
    # nothing from the warm-up that would spare the timed run a prefill.
    return [BenchRequest(list(reversed(r.prompt_token_ids)), WARMUP_OUTPUT_TOKENS) for r in longest]


def run_orcinus(config: EngineConfig, backend: str, trace: Sequence[BenchRequest], progress: bool,
                lengths_known: bool = True, profile: bool = False, detokenize: bool = False) -> BackendResult:
    from orcinus.bench.kv_usage import KVRecorder
    from orcinus.engine.llm import LLM
    from orcinus.sampling_params import SamplingParams

    res = BackendResult(backend)
    policy, chunked = backend.removesuffix("-chunked"), backend.endswith("-chunked")
    # unchunked backends: a finite budget every prompt fits in (orcinus/bench/budgets.py), unless
    # --max-num-batched-tokens gives one
    budget = config.max_num_batched_tokens or (
        CHUNKED_BUDGET if chunked else unchunked_budget(resolve_device(config), [r.prompt_len for r in trace]))
    # Without --detokenize no tokenizer is loaded, so output processing does no text work (as
    # transformers' baselines, which return ids); with it every token is detokenised, as a server does.
    kwargs = dataclasses.asdict(dataclasses.replace(config, scheduler_policy=policy, skip_tokenizer_init=not detokenize,
                                                    max_num_batched_tokens=budget))
    t0 = time.perf_counter()
    llm = LLM(**kwargs)
    res.load_s = time.perf_counter() - t0
    if detokenize and llm.engine.tokenizer is None:
        raise ValueError(f"--detokenize needs a tokenizer, and {config.model} has none; give --tokenizer")
    try:
        warm = _warmup_requests(trace)
        llm.generate([{"prompt_token_ids": r.prompt_token_ids} for r in warm],
                     [SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True) for r in warm],
                     use_tqdm=False)
        prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in trace]
        params = [SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True) for r in trace]
        with contextlib.ExitStack() as stack:
            prof = stack.enter_context(profile_phases(llm.engine)) if profile else None
            recorder = KVRecorder(llm.engine)
            recorder.restart()
            if lengths_known:
                outs, res.elapsed_s, res.cpu_s = _timed(llm.generate, prompts, params, use_tqdm=progress)
                got = [len(o.outputs[0].token_ids) for o in outs]
                set_normalized_latency(res, [(o.metrics.finished_time - o.metrics.arrival_time, n)
                                             for o, n in zip(outs, got) if o.metrics and o.metrics.finished_time])
            else:  # no max_tokens: each request ends at its trace length, unforeseen (see eos_emulation)
                from orcinus.bench.eos_emulation import generate_until_trace_lengths

                got, res.elapsed_s, res.cpu_s = _timed(generate_until_trace_lengths, llm.engine, trace)
        if prof is not None:
            res.profile = dataclasses.asdict(prof) | {"markdown": prof.to_markdown()}
        wrong = [(g, r.output_len) for g, r in zip(got, trace) if g != r.output_len]
        if wrong:
            res.status = f"error: generated/asked token counts differ, e.g. {wrong[:3]}"
        res.output_tokens = sum(got)
        recorder.detach()
        res.kv = recorder.summary().as_dict()
        res.kv_samples = [dataclasses.asdict(x) for x in recorder.samples]
    finally:
        # Join the engine's forward thread now (not at some later garbage collection), so that its
        # OpenMP thread team is gone before the next backend starts (see bench/own_thread.py).
        llm.engine.shutdown()
        del llm
        _free_memory()
    return res


def run_transformers(config: EngineConfig, backend: str, trace: Sequence[BenchRequest], progress: bool) -> BackendResult:
    from orcinus.bench.hf_baselines import (continuous_batching_available, load_hf_model, run_hf_continuous,
                                            run_hf_static)

    res = BackendResult(backend)
    device, dtype = resolve_for_config(config)
    t0 = time.perf_counter()
    hf = load_hf_model(config.model, dtype, device)
    res.load_s = time.perf_counter() - t0
    try:
        tiny = _warmup_requests(trace)
        if backend == "hf":
            run_hf_static(hf, tiny, config.max_num_seqs, progress=False)
            useful, res.elapsed_s, res.cpu_s = _timed(run_hf_static, hf, trace, config.max_num_seqs, progress)
        else:
            ok, why = continuous_batching_available(hf)
            if not ok:
                res.status = f"n/a: {why}"
                return res
            # Its own warm-up would also start and stop a manager: a tiny run does the same here.
            run_hf_continuous(hf, tiny, config.max_num_seqs, progress=False)
            useful, res.elapsed_s, res.cpu_s = _timed(run_hf_continuous, hf, trace, config.max_num_seqs, progress)
        res.output_tokens = int(useful)
    finally:
        del hf
        _free_memory()
    return res


def compute_floor(config: EngineConfig, trace: Sequence[BenchRequest], rates: DeviceRates | None = None) -> Floor:
    from orcinus.bench.trace_builder import read_model_config

    device, dtype = resolve_for_config(config)
    dims = ModelDims.from_model_config(read_model_config(config.model), dtype)
    rates = rates or measure_device(device, dtype)
    return trace_floor(dims, [r.prompt_len for r in trace], [r.output_len for r in trace], config.max_num_seqs, rates)


def run_offline(config: EngineConfig, trace: Sequence[BenchRequest], backends: Sequence[str], report: OfflineReport,
                progress: bool = True, with_floor: bool = True, lengths_known: bool = True,
                profile: bool = False, detokenize: bool = False, mode: str = "batch",
                peers=None) -> OfflineReport:
    """`mode`: batch (the whole trace at once) or single (one request at a time, single_stream.py);
    `peers`: a peers.PeerSettings for the vllm / llama-cpp backends."""
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise ValueError(f"unknown backends {unknown}; choose from {BACKENDS}")
    for backend in backends:
        logger.info("bench offline: running %s", BACKEND_LABELS[backend])
        try:
            if backend in PEER_BACKENDS:
                from orcinus.bench.peers import run_peer_backend

                res = BackendResult(backend, **run_peer_backend(config, backend, trace, peers, mode, WARMUP_REQUESTS))
            elif mode == "single" and backend in ORCINUS_BACKENDS:
                from orcinus.bench.single_stream import run_orcinus_single

                res = BackendResult(backend, **on_own_thread(run_orcinus_single, config, backend, trace,
                                                              WARMUP_REQUESTS))
            elif mode == "single":
                res = BackendResult(backend, status="n/a: --mode single runs orcinus and the peer backends")
            elif backend in ORCINUS_BACKENDS:
                res = on_own_thread(run_orcinus, config, backend, trace, progress, lengths_known,
                                     profile=profile, detokenize=detokenize)
            else:
                res = on_own_thread(run_transformers, config, backend, trace, progress)
        except Exception as exc:  # one broken baseline must not lose the others' numbers
            logger.exception("backend %s failed", backend)
            res = BackendResult(backend, status=f"error: {type(exc).__name__}: {str(exc)[:200]}")
        logger.info("bench offline: %s: %s, %s output tok/s in %s s", backend, res.status,
                    fmt(res.output_tokens_per_s), fmt(res.elapsed_s))
        report.results.append(res)
    if with_floor:
        floor = on_own_thread(compute_floor, config, trace)
        static_its = static_batch_iterations([r.output_len for r in trace], config.max_num_seqs)
        report.floor = dataclasses.asdict(floor) | {"output_tokens_per_s": floor.output_tokens_per_s,
                                                    "static_batch_iterations": static_its}
    report.ratios = {f"{a}/{b}": report.ratio(a, b) for a, b in RATIOS if report.result(a) and report.result(b)}
    report.notes = report.warnings()
    for note in report.notes:
        logger.warning("bench offline: %s", note)
    return report
