"""Forward time of the 64-request trace split by iteration kind (prompt-only, mixed, decode-only).

    python scripts/forward_by_iteration_kind.py [--requests 64] [--kv-cache-dtype auto]

A diagnostic for CPU work on the engine (docs/benchmarks.md, "Issue 21, fifth round"): it wraps
`ModelRunner.forward_outputs` of an offline `LLM` (default model, max_num_seqs 64, prompts
U(32,256) and outputs U(16,128) of random token ids, EOS ignored, greedy) and sums its wall time per
kind of iteration, so a change to prompt or decode paths shows where it landed. Not a benchmark of
record: `orcinus bench offline` is.
"""
from __future__ import annotations

import argparse
import collections
import time

import numpy as np

import orcinus  # noqa: F401  (applies the CPU thread policy before torch loads)
from orcinus.engine.llm import LLM
from orcinus.executor import model_runner
from orcinus.sampling_params import SamplingParams


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--kv-cache-dtype", default="auto")
    args = p.parse_args()

    totals: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0, 0])  # iterations, s, tokens
    original = model_runner.ModelRunner.forward_outputs

    def timed(self, inp, hidden=None):
        t = time.perf_counter()
        out = original(self, inp, hidden)
        q = inp.num_new_tokens
        kind = "decode-only" if max(q) == 1 else ("prompt-only" if min(q) > 1 else "mixed")
        row = totals[kind]
        row[0] += 1
        row[1] += time.perf_counter() - t
        row[2] += sum(q)
        return out

    model_runner.ModelRunner.forward_outputs = timed
    rng = np.random.default_rng(0)
    prompt_lens, output_lens = rng.integers(32, 257, args.requests), rng.integers(16, 129, args.requests)
    prompts = [{"prompt_token_ids": rng.integers(100, 40000, n).tolist()} for n in prompt_lens]
    params = [SamplingParams(temperature=0.0, max_tokens=int(n), ignore_eos=True) for n in output_lens]
    llm = LLM(max_num_seqs=64, skip_tokenizer_init=True, kv_cache_dtype=args.kv_cache_dtype)
    try:
        llm.generate(prompts[:4], params[:4], use_tqdm=False)  # warm-up
        totals.clear()
        wall, cpu = time.perf_counter(), time.process_time()
        outs = llm.generate(prompts, params, use_tqdm=False)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    finally:
        llm.engine.shutdown()
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    print(f"{tokens / wall:.1f} output tok/s, {wall:.2f} s wall, {cpu:.2f} CPU s")
    print("| iterations | count | forward s | ms each | tokens |\n|---|---|---|---|---|")
    for kind, (n, s, tok) in sorted(totals.items()):
        print(f"| {kind} | {n} | {s:.2f} | {1e3 * s / n:.1f} | {tok} |")


if __name__ == "__main__":
    main()
