"""The cost of constrained decoding in the engine: the same batch of requests, unconstrained and
constrained by a JSON schema, on the same engine; generated tokens per second of each, and the
ratio. The schema forces a long string, so every constrained request runs to max_tokens like the
unconstrained ones (ignore_eos), and both generate the same number of tokens. Run:

    python -m orcinus.bench.structured_overhead [--num-requests 64] [--max-tokens 32] [--rounds 2]
"""
from __future__ import annotations

import argparse
import json
import os
import time

SCHEMA = {"type": "object", "properties": {"story": {"type": "string", "minLength": 2000}}, "required": ["story"]}


def _run(llm, prompts: list[str], constrained: bool, max_tokens: int, seed: int) -> tuple[float, int]:
    from orcinus.sampling_params import SamplingParams

    params = [SamplingParams(temperature=1.0, seed=seed + i, max_tokens=max_tokens, ignore_eos=True,
                             structured_outputs={"json": SCHEMA} if constrained else None)
              for i in range(len(prompts))]
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    return elapsed, sum(len(o.outputs[0].token_ids) for o in outs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="default: the default model (SmolLM2 GGUF)")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2, help="alternating unconstrained/constrained runs")
    args = ap.parse_args(argv)

    from orcinus import LLM

    llm = LLM(model=args.model, max_num_seqs=args.num_requests)
    prompts = [f"Write story number {i} about a whale." for i in range(args.num_requests)]
    _run(llm, prompts[:2], True, 4, 0)  # warm-up: model, tokenizer and grammar compiled once
    rows = {"unconstrained": [], "constrained": []}
    for r in range(args.rounds):
        for mode in ("unconstrained", "constrained"):
            elapsed, tokens = _run(llm, prompts, mode == "constrained", args.max_tokens, 1000 * r)
            rows[mode].append(tokens / elapsed)
            print(json.dumps({"round": r, "mode": mode, "tokens": tokens, "seconds": round(elapsed, 2),
                              "tok_per_s": round(tokens / elapsed, 1)}), flush=True)
    best = {m: max(v) for m, v in rows.items()}
    print(json.dumps({"best_tok_per_s": {m: round(v, 1) for m, v in best.items()},
                      "overhead_pct": round(100 * (best["unconstrained"] / best["constrained"] - 1), 1),
                      "loadavg": os.getloadavg()}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
