"""The quantized-matmul kernels (`quant_kernels.c`): compiled on first use, loaded with ctypes.

Built like the decode-attention kernel (attention/native.py, whose compiler, flags, CPU identity
and cache folder this reuses): `cc -O3 -march=native`, so the build uses AVX-512 VNNI, AVX-VNNI or
AVX2 where the machine has them (the C file picks by `#ifdef`) and plain C elsewhere; OpenMP from
the libgomp torch already loaded. `load()` returns None where no compiler works (or
`ORCINUS_NATIVE_KERNELS=0`), and `why_unavailable()` says why; quantized layers then use the
pure-PyTorch path (dequantise, then matmul).
"""
from __future__ import annotations

import ctypes
import logging
import os
import subprocess
import threading
from pathlib import Path

from orcinus.attention import native

log = logging.getLogger("orcinus")

SOURCE = Path(__file__).with_name("quant_kernels.c")
_lock = threading.Lock()
_state: dict[str, object] = {}
_p, _i64, _int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int


def _build(compiler: str, openmp: bool) -> Path:
    return native.build_shared_object(SOURCE, compiler, openmp)


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    lib.orcinus_quant_activations.restype = None
    lib.orcinus_quant_activations.argtypes = [_p, _i64, _i64, _p, _p, _p]
    lib.orcinus_quant_round_activations.restype = None
    lib.orcinus_quant_round_activations.argtypes = [_p, _i64, _i64, _p]
    lib.orcinus_quant_matmul.restype = _int
    lib.orcinus_quant_matmul.argtypes = [_int, _p, _i64, _i64, _i64, _p, _p, _p, _i64, _p, _i64, _int]
    lib.orcinus_quant_dequantize.restype = _int
    lib.orcinus_quant_dequantize.argtypes = [_int, _p, _i64, _i64, _p, _i64, _p, _int, _int]
    lib.orcinus_quant_pack.restype = _int
    lib.orcinus_quant_pack.argtypes = [_int, _p, _i64, _i64, _i64, _p, _int]
    lib.orcinus_quant_packed_type.restype = _int
    lib.orcinus_quant_packed_type.argtypes = [_int]
    lib.orcinus_quant_openmp.restype = _int
    lib.orcinus_quant_tile_rows.restype = _int
    return lib


def load() -> ctypes.CDLL | None:
    """The kernel library, built if needed; None (once logged) when it cannot be had here."""
    with _lock:
        if "lib" in _state:
            return _state["lib"]  # type: ignore[return-value]
        lib, why = None, ""
        if os.environ.get("ORCINUS_NATIVE_KERNELS", "1") == "0":
            why = "ORCINUS_NATIVE_KERNELS=0"
        elif (compiler := native._compiler()) is None:
            why = "no C compiler (cc, gcc or clang) on PATH"
        else:
            for openmp in ((True, False) if native.OPENMP_FLAGS else (False,)):
                try:
                    lib = _declare(ctypes.CDLL(str(_build(compiler, openmp))))
                    break
                except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                    why = f"could not build the C kernel ({exc})"
            if lib is not None:
                why = ""
        if lib is None:
            log.warning("quantized matmul: pure-PyTorch path (%s)", why)
        _state["lib"], _state["why"] = lib, why
        return lib


def why_unavailable() -> str:
    load()
    return str(_state.get("why", ""))


def reset_for_tests() -> None:
    with _lock:
        _state.clear()
