"""CPU-specific defaults: whether `dtype="auto"` runs bfloat16, and how many threads to use.

bfloat16 on CPU pays only with native bf16 matrix units: Intel AMX (`amx_bf16`) multiplies bf16
tiles in hardware; without it PyTorch converts to float32 around every GEMM and runs slower than
float32 (measurements on this project's AMD EPYC: docs/benchmarks.md, "Speed").
So `auto` considers bf16 only when /proc/cpuinfo lists amx_bf16 or avx512_bf16, and then only if
`orcinus bench bf16` (orcinus/bench/bf16_check.py) has measured, for this model on this CPU, that
bf16 is faster end to end AND gives the same greedy tokens as float32 on the reference prompts.
Running both at every start-up would cost more than most runs save, so the verdict is stored
(`store_verdict`, read back by `stored_verdict`: the store lives here, at the bottom layer, so that
resolving `dtype="auto"` never imports the benchmarks); float32 stays the default wherever the
check has not been run or did not pass.

Threads: PyTorch defaults to the number of physical cores of the whole machine, even when this
process may only run on some (taskset, cgroups, containers). Two processes each spinning
OpenMP threads over the same cores slow each other several times over; `cpu_threads()` sizes the
pool to the cores this process may use. Several engines on one machine should also run with
OMP_WAIT_POLICY=passive (idle OpenMP threads sleep instead of spinning) and split the cores
(OMP_NUM_THREADS per process, or taskset).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
from dataclasses import asdict, dataclass

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


def cpu_model() -> str:
    """The CPU's model name (the bf16 verdict is stored per model and CPU)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


@dataclass
class Bf16Verdict:
    """What `orcinus bench bf16` measured for one model on one CPU."""

    model: str
    cpu: str
    float32_tok_s: float
    bfloat16_tok_s: float
    prompts: int
    agreeing_prompts: int  # prompts whose greedy tokens are identical in both dtypes

    @property
    def faster(self) -> bool:
        return self.bfloat16_tok_s > self.float32_tok_s

    @property
    def agrees(self) -> bool:
        return self.agreeing_prompts == self.prompts

    @property
    def use_bf16(self) -> bool:
        return self.faster and self.agrees


def verdict_path(model: str, cpu: str) -> str:
    root = os.environ.get("ORCINUS_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "orcinus"))
    key = hashlib.sha256(f"{os.path.abspath(model)}\n{cpu}".encode()).hexdigest()[:16]
    return os.path.join(root, "bf16", f"{key}.json")


def stored_verdict(model: str) -> Bf16Verdict | None:
    try:
        with open(verdict_path(model, cpu_model())) as f:
            return Bf16Verdict(**json.load(f))
    except (OSError, ValueError, TypeError):
        return None


def store_verdict(verdict: Bf16Verdict) -> str:
    """Write `verdict` where `stored_verdict` finds it; returns the path."""
    out = verdict_path(verdict.model, verdict.cpu)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(asdict(verdict), f, indent=2)
    return out


@dataclass(frozen=True)
class DtypeChoice:
    dtype: torch.dtype
    reason: str


def choose_cpu_dtype(flags: frozenset[str], verdict: Bf16Verdict | None = None) -> DtypeChoice:
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
def auto_cpu_dtype(model_path: str | None = None) -> DtypeChoice:
    """This machine's choice for the checkpoint at `model_path` (already resolved: a folder or a
    .gguf file; None: no verdict to read), decided once per process."""
    flags = cpu_flags()
    verdict = None
    if model_path is not None and any(f in flags for f in BF16_FLAGS):
        verdict = stored_verdict(model_path)
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
