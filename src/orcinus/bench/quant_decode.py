"""Quantized GGUF weights against the dequantised path, one process per run so memory is its own:
resident memory after loading, the model's weight bytes, and single-stream decode (one request at
a time: ms per output token after the first).

    python -m orcinus.bench.quant_decode [--model FILE.gguf] [--modes gguf,none] [--rounds 2]

Runs alternate between the modes (gguf, none, gguf, none, ...) so that a shared machine's load
falls on both alike; `uptime`'s load average is printed beside each run.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _child(model: str | None, mode: str, dtype: str, prompt_len: int, output_len: int, requests: int) -> dict:
    from orcinus import LLM, SamplingParams
    from orcinus.layers.quantized_linear import quantized_bytes

    before = _rss_mib()
    t = time.perf_counter()
    llm = LLM(model, quantization=mode, dtype=dtype, kv_cache_memory=64 << 20, skip_tokenizer_init=True,
              enable_prefix_caching=False)  # the timed run must recompute its prompt like the first
    load_s = time.perf_counter() - t
    runner = llm.engine.executor.driver_worker.runner
    q_bytes, all_bytes = quantized_bytes(runner.model)
    after_load = _rss_mib()
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    per_token = []
    for i in range(requests + 1):  # the first request warms up (kernel build, allocator)
        prompt = [(7 * i + 13 * j) % 1000 + 100 for j in range(prompt_len)]
        t0 = time.perf_counter()
        out = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0, max_tokens=1,
                                                                        ignore_eos=True), use_tqdm=False)
        first = time.perf_counter() - t0
        t1 = time.perf_counter()
        out = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
        total = time.perf_counter() - t1
        n = len(out[0].outputs[0].token_ids)
        if i:
            # the whole request minus its first token's time, per later token
            per_token.append((total - first) / (n - 1) * 1e3)
    return {"mode": mode, "load_s": load_s, "rss_before_mib": before, "rss_loaded_mib": after_load,
            "weights_mib": all_bytes / 2**20, "quantized_weights_mib": q_bytes / 2**20,
            "decode_ms_per_token": sorted(per_token)[len(per_token) // 2], "runs_ms": per_token}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--modes", default="gguf,none")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--requests", type=int, default=3)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.model, args.child, args.dtype, args.prompt_len, args.output_len, args.requests)))
        return
    for _ in range(args.rounds):
        for mode in args.modes.split(","):
            load = os.getloadavg()[0]
            cmd = [sys.executable, "-m", "orcinus.bench.quant_decode", "--child", mode, "--dtype", args.dtype,
                   "--prompt-len", str(args.prompt_len), "--output-len", str(args.output_len),
                   "--requests", str(args.requests)] + (["--model", args.model] if args.model else [])
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(done.stderr[-2000:])
            r = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"quantization={mode:5s} load avg {load:5.2f} -> {os.getloadavg()[0]:5.2f}: "
                  f"RSS after load {r['rss_loaded_mib']:.0f} MiB (interpreter + torch before: "
                  f"{r['rss_before_mib']:.0f}), weights {r['weights_mib']:.0f} MiB "
                  f"({r['quantized_weights_mib']:.0f} quantized), decode {r['decode_ms_per_token']:.1f} ms/token "
                  f"(runs {', '.join(f'{x:.1f}' for x in r['runs_ms'])})", flush=True)


if __name__ == "__main__":
    main()
