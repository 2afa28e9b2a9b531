"""dtype=auto on CPU: bf16 only with native bf16 units and a stored verdict that bf16 is faster and
agrees with float32; threads by affinity."""
from __future__ import annotations

import dataclasses
import json
import os

import torch

from orcinus.config import EngineConfig
from orcinus.cpu_features import (Bf16Verdict, auto_cpu_dtype, choose_cpu_dtype, configure_cpu_threads, cpu_flags,
                                   cpu_model, cpu_threads, stored_verdict, verdict_path)
from orcinus.executor.platform import resolve_dtype

CPUINFO = "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu sse2 avx512f {extra}\n\nprocessor\t: 1\n"


def verdict(f32: float, bf16: float, agreeing: int, prompts: int = 8) -> Bf16Verdict:
    return Bf16Verdict("m", "cpu", f32, bf16, prompts, agreeing)


def test_flags_are_read_from_cpuinfo():
    assert cpu_flags(CPUINFO.format(extra="amx_bf16")) >= {"amx_bf16", "avx512f"}
    assert "amx_bf16" not in cpu_flags(CPUINFO.format(extra=""))
    assert cpu_flags("no flags line") == frozenset()


def test_no_native_bf16_means_float32_whatever_the_verdict():
    choice = choose_cpu_dtype(cpu_flags(CPUINFO.format(extra="")), verdict(1.0, 3.0, 8))
    assert choice.dtype is torch.float32 and "no native bf16" in choice.reason


def test_native_bf16_needs_a_verdict_that_is_both_faster_and_agreeing():
    flags = cpu_flags(CPUINFO.format(extra="amx_bf16 avx512_bf16"))
    assert choose_cpu_dtype(flags, None).dtype is torch.float32
    assert "orcinus bench bf16" in choose_cpu_dtype(flags, None).reason
    disagrees = choose_cpu_dtype(flags, verdict(1.0, 2.0, agreeing=5))
    assert disagrees.dtype is torch.float32 and "3/8" in disagrees.reason
    slower = choose_cpu_dtype(flags, verdict(2.0, 1.0, agreeing=8))
    assert slower.dtype is torch.float32 and "no faster" in slower.reason
    good = choose_cpu_dtype(flags, verdict(1.0, 1.5, agreeing=8))
    assert good.dtype is torch.bfloat16 and "1.50x" in good.reason


def test_stored_verdict_round_trips_per_model_and_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("ORCINUS_CACHE", str(tmp_path))
    model = str(tmp_path / "model.gguf")
    assert stored_verdict(model) is None
    path = verdict_path(model, cpu_model())
    os.makedirs(os.path.dirname(path))
    with open(path, "w") as f:
        json.dump(dataclasses.asdict(Bf16Verdict(model, cpu_model(), 1.0, 2.0, 8, 8)), f)
    got = stored_verdict(model)
    assert got is not None and got.use_bf16
    assert stored_verdict(str(tmp_path / "other.gguf")) is None


def test_auto_dtype_on_this_cpu_follows_the_rule(tmp_path, monkeypatch):
    # An explicit dtype is never overridden; auto is whatever the flag rule gives this machine,
    # with the verdict stored for the resolved model path.
    monkeypatch.setenv("ORCINUS_CACHE", str(tmp_path))
    model = str(tmp_path / "model.gguf")
    cpu = torch.device("cpu")
    assert resolve_dtype(EngineConfig(dtype="float32"), cpu, model) is torch.float32
    got = resolve_dtype(EngineConfig(dtype="auto"), cpu, model)
    assert got is auto_cpu_dtype(model).dtype
    if not any(f in cpu_flags() for f in ("amx_bf16", "avx512_bf16")):
        assert got is torch.float32


def test_auto_dtype_reads_the_verdict_stored_for_the_resolved_path(tmp_path, monkeypatch):
    # The store is cpu_features' own (dtype resolution never imports the benchmarks): a verdict
    # written by store_verdict for this path and CPU turns bf16 on where the CPU has the units.
    from orcinus import cpu_features

    monkeypatch.setenv("ORCINUS_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_features, "cpu_flags", lambda: frozenset({"amx_bf16"}))
    model = str(tmp_path / "model.gguf")
    assert cpu_features.auto_cpu_dtype.__wrapped__(model).dtype is torch.float32  # nothing stored yet
    cpu_features.store_verdict(Bf16Verdict(model, cpu_model(), 1.0, 1.4, 8, 8))
    assert cpu_features.auto_cpu_dtype.__wrapped__(model).dtype is torch.bfloat16
    assert cpu_features.auto_cpu_dtype.__wrapped__(None).dtype is torch.float32  # no path, no verdict


def test_threads_follow_the_affinity_mask_unless_omp_num_threads_is_set(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert configure_cpu_threads() == cpu_threads() == len(os.sched_getaffinity(0))
        assert configure_cpu_threads(local_ranks=cpu_threads() * 2) == 1  # never below one
        assert configure_cpu_threads(local_ranks=2) == max(1, cpu_threads() // 2)
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        assert configure_cpu_threads() == 1
    finally:
        torch.set_num_threads(before)
