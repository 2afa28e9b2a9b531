"""Micro-benchmark of the quantized linear paths at the default model's shapes, per batch size:
the integer kernel on the GGUF blocks (register tiles from their crossover up where the CPU has
AVX-512), the same on the layout packed at load (layers/packed_weights.py; AVX-512 only), dequantise-then-GEMM in float32 and in bfloat16, and the float32 weight of `--quantization none`.

    python -m orcinus.bench.quant_matmul [--threads N] [--rows 1,4,16,32,64,128,512]

Prints one line per (shape, rows) with the milliseconds of each path (fastest of several runs, as the machine is shared);
the crossovers of `quantized_linear.dequant_min_rows` were chosen from this (docs/benchmarks.md).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

# (name, out_features, in_features, ggml type): SmolLM2-135M's layers (Q4_1) and its LM head (Q8_0)
SHAPES = [("qkv", 960, 576, 3), ("o_proj", 576, 576, 3), ("gate_up", 3072, 576, 3), ("down", 576, 1536, 3),
          ("lm_head", 49152, 576, 8)]


def _best_ms(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times) * 1e3  # the least disturbed run: the machine is shared


def _packed(lib, ql, seg, k: int):
    """The segment packed as the loader packs it, or None where this build has no packed layout."""
    ptype = lib.orcinus_quant_packed_type(seg.qtype)
    if ptype == 0 or lib.orcinus_quant_tile_rows() <= 0:
        return None
    out = torch.empty(seg.out_rows, k // 32 * ql.PACKED_TYPES[ptype][2], dtype=torch.uint8)
    if lib.orcinus_quant_pack(seg.qtype, seg.raw.data_ptr(), seg.out_rows, k, seg.raw.shape[1], out.data_ptr(),
                              torch.get_num_threads()) != 0:
        return None
    return ql.Segment(0, seg.out_rows, ptype, out)


def run(rows_list: list[int], repeat: int) -> list[dict]:
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    from orcinus.layers import quant_native
    from orcinus.layers import quantized_linear as ql

    lib = quant_native.load()
    if lib is None:
        raise SystemExit(f"no quantized kernel here: {quant_native.why_unavailable()}")
    rng = np.random.default_rng(0)
    results = []
    for name, n, k, qtype in SHAPES:
        w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
        raw = torch.from_numpy(np.ascontiguousarray(quantize(w, GGMLQuantizationType(qtype))))
        wf = ql.dequantize(qtype, raw, k)
        wf_col = wf.t().contiguous().t()  # the float path's layout (lay_out_for_cpu)
        weight = torch.nn.Parameter(raw, requires_grad=False)
        weight.quant = ql.QuantState(k, n, torch.float32, [ql.Segment(0, n, qtype, raw)])
        seg = weight.quant.segments[0]
        packed = _packed(lib, ql, seg, k)
        for rows in rows_list:
            x = torch.randn(rows, k)
            out = torch.empty(rows, n)

            def kernel():
                ql._kernel_matmul(lib, seg, k, ql.quantize_activations(lib, x), out, out)

            def kernel_packed():
                ql._kernel_matmul(lib, packed, k, ql.quantize_activations(lib, x), out, out)

            def dequant_gemm():
                act = ql.quantize_activations(lib, x)
                ql._dequant_gemm(seg, k, ql._rounded(act, torch.float32), out)

            xb = x.to(torch.bfloat16)
            outb = torch.empty(rows, n, dtype=torch.bfloat16)

            def dequant_gemm_bf16():
                ql._dequant_gemm(seg, k, xb, outb)

            def float32():
                torch.nn.functional.linear(x, wf if name == "lm_head" else wf_col)

            r = {"shape": name, "rows": rows, "kernel_ms": _best_ms(kernel, repeat),
                 "packed_ms": _best_ms(kernel_packed, repeat) if packed is not None else None,
                 "dequant_gemm_ms": _best_ms(dequant_gemm, repeat),
                 "dequant_gemm_bf16_ms": _best_ms(dequant_gemm_bf16, repeat), "float32_ms": _best_ms(float32, repeat)}
            results.append(r)
            packed_txt = f"{r['packed_ms']:8.3f} ms" if packed is not None else "     n/a"
            print(f"{name:8s} {n:6d}x{k:<5d} rows {rows:4d}: kernel {r['kernel_ms']:8.3f} ms  packed {packed_txt}  "
                  f"dequant+GEMM {r['dequant_gemm_ms']:8.3f} ms  bf16 dequant+GEMM {r['dequant_gemm_bf16_ms']:8.3f} ms  "
                  f"float32 {r['float32_ms']:8.3f} ms", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rows", default="1,4,8,16,32,64,128,512")
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"threads {torch.get_num_threads()}")
    run([int(r) for r in args.rows.split(",")], args.repeat)


if __name__ == "__main__":
    main()
