"""`--simulate HARDWARE` for `bench offline` and `bench sweep`: the same trace, the same reports
and JSON as a real run, with the orcinus backends run on the simulated executor (elapsed_s and
every latency predicted, in virtual seconds)."""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Callable, Sequence

import torch

from orcinus.bench.workloads import BenchRequest
from orcinus.config import EngineConfig
from orcinus.sim.clock import VirtualClock
from orcinus.sim.cost_model import Parallel
from orcinus.sim.engine import SimTarget, build_sim_engine
from orcinus.sim.hardware import load_hardware
from orcinus.sim.shapes import PRESETS, load_shape

logger = logging.getLogger(__name__)


def serving_dtype(config: EngineConfig, hardware_kind: str) -> str:
    """The dtype the real engine would serve in: the given one, else what `auto` picks on this
    CPU (for a CPU target) or float16 (GPUs)."""
    if config.dtype != "auto":
        return config.dtype
    if hardware_kind == "cpu":
        import dataclasses as dc

        from orcinus.executor.platform import resolve_for_config

        return str(resolve_for_config(dc.replace(config, device="cpu"))[1]).removeprefix("torch.")
    return "float16"


def target_from(config: EngineConfig, hardware: str) -> SimTarget:
    hw = load_hardware(hardware)
    dtype = serving_dtype(config, hw.kind)
    shape = load_shape(config.model)
    if hw.kind == "cpu" and config.model not in PRESETS:
        # the weights' bytes as the model was held when `bench calibrate` loaded it (quantized blocks)
        from orcinus.sim.weight_bytes import lookup_weight_info, model_key

        weights = lookup_weight_info(model_key(config.model, config.quantization, dtype))
        if weights is None:
            logger.warning("no measured weight bytes for %s (%s, %s): the cost model assumes %s weights; "
                           "`orcinus bench calibrate --model ...` measures them", shape.name, config.quantization,
                           dtype, dtype)
        shape = dataclasses.replace(shape, weights=weights)
    return SimTarget(shape, hw, Parallel(config.tensor_parallel_size, config.pipeline_parallel_size), dtype)


def sim_trace(spec, model: str | None) -> list[BenchRequest]:
    """The trace of `spec`: for a preset (no checkpoint on disk) random token ids in its vocabulary,
    ShareGPT lengths counted with the default model's tokenizer."""
    from orcinus.bench.trace_builder import build_trace

    if model not in PRESETS:
        return build_trace(spec, model)
    if spec.dataset == "sharegpt":
        shape = PRESETS[model]
        return [dataclasses.replace(r, prompt_token_ids=[t % shape.vocab_size for t in r.prompt_token_ids])
                for r in build_trace(spec, None)]
    from orcinus.bench.workloads import (ORCA_OUTPUT_LEN, ORCA_PROMPT_LEN, RANDOM_OUTPUT_LEN, RANDOM_PROMPT_LEN,
                                         TokenSampler, random_trace)

    orca = spec.dataset == "orca"
    return random_trace(spec.resolved_num_requests(),
                        spec.prompt_len or (ORCA_PROMPT_LEN if orca else RANDOM_PROMPT_LEN),
                        spec.output_len or (ORCA_OUTPUT_LEN if orca else RANDOM_OUTPUT_LEN),
                        TokenSampler(PRESETS[model].vocab_size), spec.seed, spec.shared_prefix_len)


# ------------------------------------------------------------------------------------ offline
def simulate_orcinus_backend(config: EngineConfig, backend: str, target: SimTarget, trace: Sequence[BenchRequest],
                             lengths_known: bool = True):
    """`bench offline`'s run_orcinus on the simulated executor: every request at time 0."""
    from orcinus.bench.kv_usage import KVRecorder
    from orcinus.bench.offline import CHUNKED_BUDGET, BackendResult, set_normalized_latency
    from orcinus.sim.replay import trace_lengths
    from orcinus.sampling_params import SamplingParams

    res = BackendResult(backend)
    policy, chunked = backend.removesuffix("-chunked"), backend.endswith("-chunked")
    # the real run's budgets (bench/offline.run_orcinus): unchunked backends get bench/budgets.py's
    # finite one for the target's device type, which decides how many prompts share an iteration
    from orcinus.bench.budgets import unchunked_budget

    device = torch.device("cpu" if target.hardware.kind == "cpu" else "cuda")
    budget = config.max_num_batched_tokens or (
        CHUNKED_BUDGET if chunked else unchunked_budget(device, [r.prompt_len for r in trace]))
    cfg = dataclasses.replace(config, scheduler_policy=policy, max_num_batched_tokens=budget)
    clock = VirtualClock()
    engine, executor = build_sim_engine(cfg, target, None if lengths_known else trace_lengths(trace, "off-"), clock)
    res.load_s = 0.0
    try:
        recorder = KVRecorder(engine)
        recorder.restart()
        got: dict[str, int] = {}
        ended: dict[str, float] = {}  # virtual finish time per request (all arrive at 0)
        for i, r in enumerate(trace):
            params = SamplingParams(temperature=0.0, max_tokens=r.output_len if lengths_known else None,
                                    ignore_eos=lengths_known)
            engine.add_request(f"off-{i}", {"prompt_token_ids": r.prompt_token_ids}, params, arrival_time=0.0)
        while engine.has_unfinished_requests():
            for out in engine.step():
                got[out.request_id] = len(out.outputs[0].token_ids)
                if out.finished:
                    ended[out.request_id] = clock.now
        recorder.detach()
        res.elapsed_s = clock.now
        counts = [got.get(f"off-{i}", 0) for i in range(len(trace))]
        wrong = [(g, r.output_len) for g, r in zip(counts, trace) if g != r.output_len]
        if wrong:
            res.status = f"error: generated/asked token counts differ, e.g. {wrong[:3]}"
        res.output_tokens = sum(counts)
        set_normalized_latency(res, [(ended[rid], n) for rid, n in got.items() if rid in ended])
        res.kv = recorder.summary().as_dict()
        res.profile = {"simulated": True, "iterations": executor.stats.iterations,
                       "busy_s": executor.stats.busy_s, "overhead_s": executor.stats.overhead_s,
                       "markdown": f"simulated: {executor.stats.iterations} iterations, device busy "
                                   f"{executor.stats.busy_s:.3f} s, engine overhead {executor.stats.overhead_s:.3f} s"}
    finally:
        engine.shutdown()
    return res


def run_offline_simulated(config: EngineConfig, hardware: str, trace: Sequence[BenchRequest], backends: Sequence[str],
                          report, lengths_known: bool = True, with_floor: bool = True):
    from orcinus.bench.floor import DeviceRates, ModelDims, static_batch_iterations, trace_floor
    from orcinus.bench.offline import BACKENDS, ORCINUS_BACKENDS, RATIOS, BackendResult

    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise ValueError(f"unknown backends {unknown}; choose from {BACKENDS}")
    target = target_from(config, hardware)
    report.settings |= {"simulated": target.describe(), "hardware": target.hardware.name,
                        "resolved_dtype": target.dtype}
    for backend in backends:
        if backend not in ORCINUS_BACKENDS:
            report.results.append(BackendResult(backend, status="n/a: not simulated (orcinus backends only)"))
            continue
        try:
            res = simulate_orcinus_backend(config, backend, target, trace, lengths_known)
        except Exception as exc:  # one failing backend must not lose the others' numbers
            logger.exception("simulated backend %s failed", backend)
            res = BackendResult(backend, status=f"error: {type(exc).__name__}: {str(exc)[:200]}")
        report.results.append(res)
    if with_floor:  # the floor at the datasheet's rates of every device together
        from orcinus.sim.shapes import DTYPE_BYTES

        s, hw = target.shape, target.hardware
        elem = DTYPE_BYTES[target.dtype]
        dims = ModelDims(s.num_layers, s.hidden_size, s.num_heads, s.num_kv_heads, s.head_dim, s.intermediate_size,
                         s.vocab_size, elem, elem, s.mlp_matrices)
        rates = DeviceRates(hw.memory_bandwidth * target.parallel.devices, hw.flops_for(target.dtype)
                            * target.parallel.devices, f"{target.parallel.devices} x {hw.name} (datasheet)")
        floor = trace_floor(dims, [r.prompt_len for r in trace], [r.output_len for r in trace], config.max_num_seqs,
                            rates)
        static_its = static_batch_iterations([r.output_len for r in trace], config.max_num_seqs)
        report.floor = dataclasses.asdict(floor) | {"output_tokens_per_s": floor.output_tokens_per_s,
                                                    "static_batch_iterations": static_its}
    report.ratios = {f"{a}/{b}": report.ratio(a, b) for a, b in RATIOS if report.result(a) and report.result(b)}
    report.notes = [f"simulated on {target.describe()}: times are predicted, not measured"]
    return report


# ------------------------------------------------------------------------------------ sweep
def simulate_sweep_config(base: EngineConfig, cfg, hardware: str, rates: Sequence[float], trace: Sequence[BenchRequest],
                          mode, seed: int, add_engine_args: Callable, slos_ms: dict[str, float] | None,
                          lengths_known: bool = True) -> list:
    from orcinus.bench.sweep import apply_flags
    from orcinus.sim.sweep import simulate_point

    config = apply_flags(base, cfg.engine_args, add_engine_args)
    target = target_from(config, hardware)
    points = []
    for rate in rates:
        point, sim = simulate_point(config, target, cfg.label, trace, rate, mode, seed, slos_ms, lengths_known)
        logger.info("simulated %s @ %s req/s: %.3f req/s, median normalized latency %.1f ms/token (%d iterations)",
                    cfg.label, "inf" if math.isinf(rate) else f"{rate:g}", point.request_throughput,
                    point.median_normalized_latency_ms, sim["iterations"])
        points.append(point)
    return points
