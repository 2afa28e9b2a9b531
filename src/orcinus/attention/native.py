"""The CPU paged-attention kernels (`paged_attention.c` for decodes, with `paged_prefill.h` for prompt
chunks): compiled (or found in the cache) when a CPU worker starts (`PagedCpuAttention.warm_up`),
loaded with ctypes.

Why compile at run time rather than at install: `-march=native` makes the compiler use the vector
units of the machine that runs it (AVX-512 here, AVX2 elsewhere), and a plain C file with no
Python or torch headers builds in about a second with the system's `cc`. The shared object is
cached under `$ORCINUS_CACHE/kernels` (default `~/.cache/orcinus/kernels`), keyed by the source,
the flags, the compiler and the CPU, so a cache shared between machines never hands one CPU
another's build.

The kernel's threads are OpenMP's where `-fopenmp` builds (torch's own pool, see OPENMP_FLAGS),
else pthreads of its own; `uses_openmp()` says which. Where no compiler works (or
`ORCINUS_NATIVE_KERNELS=0`), `load()` returns None and says why in `why_unavailable()`; the paged
backend then keeps its per-request PyTorch path.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger("orcinus")

SOURCE = Path(__file__).with_name("paged_attention.c")
# -ffast-math only when compiling, never when linking: linking a shared object with it would
# switch the whole process's floating point to flush-to-zero (crtfastmath.o).
# 512-bit vectors where the CPU has them: 10 % faster than gcc's default 256 on an AVX-512 Xeon.
COMPILE_FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fPIC", "-ffast-math",
                 "-fopenmp-simd", "-std=c11"]
LINK_FLAGS = ["-shared", "-pthread"]
# Headers every kernel may include (csrc/float_formats.h: the 16-bit float conversions).
SHARED_INCLUDE = Path(__file__).resolve().parents[1] / "csrc"
# The kernel's threads come from OpenMP where the compiler has it: the shared object then needs
# `libgomp.so.1`, which the dynamic linker finds already loaded by torch (same soname), so the
# kernel runs on torch's own thread pool. With pthreads of its own, a second thread ran no faster
# than one inside the engine (1.93 against 1.87 ms per layer, two cores): torch's OpenMP workers
# were still spinning on the other core. Where -fopenmp does not build, pthreads it is.
OPENMP_FLAGS = ["-fopenmp"]
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}  # the kernels' `dtype` argument (queries, output)
KV_DTYPE_CODES = {**DTYPE_CODES, torch.float16: 2}  # their `kv_dtype` argument (the pool)

_lock = threading.Lock()
_state: dict[str, object] = {}


def cache_dir() -> Path:
    root = os.environ.get("ORCINUS_CACHE") or os.path.join(Path.home(), ".cache", "orcinus")
    return Path(root) / "kernels"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_identity() -> str:
    """What the build depends on besides the source: the CPU's model and feature flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [line for line in text.splitlines() if line.startswith(("model name", "flags"))]
        return "\n".join(dict.fromkeys(lines))  # one copy of each line, not one per core
    except OSError:
        return platform.processor() or platform.machine()


def build_shared_object(source_path: Path, compiler: str, openmp: bool = True) -> Path:
    """Compile `source_path` into a shared object in the kernel cache (or find it there), keyed by
    the source, the flags, the compiler and the CPU. Every C kernel of orcinus is built here."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    # The headers beside the source and the shared ones (included with #include "...") are part of
    # what is built.
    headers = sorted(source_path.parent.glob("*.h")) + sorted(SHARED_INCLUDE.glob("*.h"))
    source = b"\0".join([source_path.read_bytes(), *(h.read_bytes() for h in headers)])
    extra = OPENMP_FLAGS if openmp else []
    compile_flags, link_flags = COMPILE_FLAGS + [f"-I{SHARED_INCLUDE}"] + extra, LINK_FLAGS + extra
    key = hashlib.sha256(b"\0".join([source, " ".join(compile_flags + link_flags).encode(),
                                     version.encode(), _cpu_identity().encode()])).hexdigest()[:16]
    stem = source_path.stem
    target = cache_dir() / f"{stem}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        obj, lib = Path(tmp) / f"{stem}.o", Path(tmp) / f"{stem}.so"
        for command in ([compiler, *compile_flags, "-c", str(source_path), "-o", str(obj)],
                        [compiler, *link_flags, str(obj), "-o", str(lib), "-lm"]):
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(command)} failed: {done.stderr.strip()[-500:]}")
        os.replace(lib, target)  # atomic: a concurrent process sees the whole file or none
    return target


def _build(compiler: str, openmp: bool = True) -> Path:
    return build_shared_object(SOURCE, compiler, openmp)


def _open(compiler: str) -> ctypes.CDLL:
    """The OpenMP build where it builds and loads, else the pthreads one."""
    if OPENMP_FLAGS:
        try:
            return ctypes.CDLL(str(_build(compiler, openmp=True)))
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            log.info("CPU decode attention: built without OpenMP (%s)", exc)
    return ctypes.CDLL(str(_build(compiler, openmp=False)))


def load() -> ctypes.CDLL | None:
    """The kernel library, built if needed; None (once logged) when it cannot be had here."""
    with _lock:
        if "lib" in _state:
            return _state["lib"]  # type: ignore[return-value]
        lib, why = None, ""
        if os.environ.get("ORCINUS_NATIVE_KERNELS", "1") == "0":
            why = "ORCINUS_NATIVE_KERNELS=0"
        elif (compiler := _compiler()) is None:
            why = "no C compiler (cc, gcc or clang) on PATH"
        else:
            try:
                lib = _open(compiler)
                fn = lib.orcinus_paged_decode
                fn.restype = ctypes.c_int
                fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                               ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                               ctypes.c_void_p] + [ctypes.c_int] * 6 + [ctypes.c_float, ctypes.c_int,
                                                                         ctypes.c_int, ctypes.c_int]
                fn = lib.orcinus_paged_prefill
                fn.restype = ctypes.c_int
                fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                               ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                               ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_int] * 6 + [
                                   ctypes.c_float, ctypes.c_int, ctypes.c_int, ctypes.c_int]
            except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                lib, why = None, f"could not build the C kernel ({exc})"
        if lib is None:
            log.warning("CPU paged attention: per-request PyTorch path (%s)", why)
        _state["lib"], _state["why"] = lib, why
        return lib


def uses_openmp() -> bool:
    """Whether the loaded kernel runs its threads on OpenMP (False: pthreads, or no kernel)."""
    lib = load()
    return lib is not None and lib.orcinus_native_openmp() == 1


def why_unavailable() -> str:
    load()
    return str(_state.get("why", ""))


def reset_for_tests() -> None:
    """Forget the loaded library so that the next `load()` reads the environment again."""
    with _lock:
        _state.clear()
