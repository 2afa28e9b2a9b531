"""CPU-specific defaults: whether `dtype="auto"` runs bfloat16, and how many threads to use.

bfloat16 on CPU pays only with native bf16 matrix units: Intel AMX (`amx_bf16`) multiplies bf16
tiles in hardware; without it PyTorch converts to float32 around every GEMM and runs slower than
float32 (measurements on this project's AMD EPYC: docs/benchmarks.md, "Speed").
So `auto` considers bf16 only when /proc/cpuinfo lists amx_bf16 or avx512_bf16, and then only if
`orcinus bench bf16` (orcinus/bench/bf16_check.py) has measured, for this model on this CPU, that
bf16 is faster end to end AND gives the same greedy tokens as float32 on the reference prompts.
Running both at every start-up would cost more than most runs save, so the verdict is stored;
float32 stays the default wherever the check has not been run or did not pass.

Threads: PyTorch defaults to the number of physical cores of the whole machine, even when this
process may only run on some (taskset, cgroups, containers). Two processes each spinning
OpenMP threads over the same cores slow each other several times over; `cpu_threads()` sizes the
pool to the cores this process may use. Several engines on one machine should also run with
OMP_WAIT_POLICY=passive (idle OpenMP threads sleep instead of spinning) and split the cores
(OMP_NUM_THREADS per process, or taskset).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The feature flags of the first processor in /proc/cpuinfo (empty where there is none)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return frozenset()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


@dataclass(frozen=True)
class DtypeChoice:
    dtype: torch.dtype
    reason: str


def choose_cpu_dtype(flags: frozenset[str], verdict=None) -> DtypeChoice:
    """float32 unless the CPU has native bf16 units and `verdict` (a stored `orcinus bench bf16`
    result for this model and CPU) says bf16 was faster and agreed with float32."""
    native = [f for f in BF16_FLAGS if f in flags]
    if not native:
        return DtypeChoice(torch.float32, "auto: no native bf16 units (amx_bf16/avx512_bf16) on this CPU")
    units = "+".join(native)
    if verdict is None:
        return DtypeChoice(torch.float32, f"auto: {units} present; run `orcinus bench bf16` to check bf16 "
                                          "speed and greedy agreement for this model")
    if not verdict.agrees:
        return DtypeChoice(torch.float32, f"auto: bf16 greedy output differs from float32 on "
                                          f"{verdict.prompts - verdict.agreeing_prompts}/{verdict.prompts} "
                                          "reference prompts")
    if not verdict.faster:
        return DtypeChoice(torch.float32, f"auto: {units} present but bf16 measured no faster")
    return DtypeChoice(torch.bfloat16, f"auto: {units}, bf16 {verdict.bfloat16_tok_s / verdict.float32_tok_s:.2f}x "
                                       "faster and agrees with float32 on the reference prompts")


@functools.lru_cache(maxsize=8)
def auto_cpu_dtype(model: str | None = None) -> DtypeChoice:
    """This machine's choice for `model`, decided once per process."""
    flags = cpu_flags()
    verdict = None
    if any(f in flags for f in BF16_FLAGS):
        from orcinus.bench.bf16_check import stored_verdict
        from orcinus.models.loader import ModelNotFound, resolve_model_path
        try:
            verdict = stored_verdict(resolve_model_path(model))
        except ModelNotFound:
            verdict = None
    return choose_cpu_dtype(flags, verdict)


def cpu_threads() -> int:
    """Cores this process may run on (its affinity mask), not the machine's core count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def configure_cpu_threads(local_ranks: int = 1) -> int:
    """Size torch's thread pool to this process's share of the usable cores (the cores split evenly
    among the `local_ranks` worker processes of one engine), unless the user chose OMP_NUM_THREADS."""
    want = max(1, cpu_threads() // max(1, local_ranks))
    if "OMP_NUM_THREADS" not in os.environ and torch.get_num_threads() != want:
        torch.set_num_threads(want)
    return torch.get_num_threads()
