"""`bench offline --backends vllm`: the trace through vLLM's offline `LLM`, in its own interpreter.

Started by orcinus/bench/peers.py as `python peer_worker_vllm.py REQUEST.json RESULT.json`
(protocol: peer_protocol.py, beside it); imports nothing of orcinus. vLLM keeps its own defaults (its CPU
backend binds its OpenMP threads and runs its engine core in a child process); only what the
trace needs is set: token-id prompts (no tokenizer), greedy, EOS ignored, max_num_seqs.
"""
from __future__ import annotations

import sys
import time

from peer_protocol import Clock, run_worker


def _single_stream(llm, SamplingParams, trace) -> list[dict]:
    """One request at a time through the engine's step loop: the time its first token arrives
    and the mean time between the later ones."""
    engine = llm.llm_engine
    rows = []
    for i, (ids, n) in enumerate(trace):
        params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, detokenize=False)
        t0 = time.perf_counter()
        engine.add_request(f"single-{i}", {"prompt_token_ids": ids}, params)
        first = last = None
        got = 0
        while engine.has_unfinished_requests():
            for out in engine.step():
                now = time.perf_counter()
                count = len(out.outputs[0].token_ids)
                if count > got:
                    got = count
                    first = now if first is None else first
                    last = now
        rows.append({"ttft_s": first - t0, "tpot_s": (last - first) / (got - 1) if got > 1 else float("nan"),
                     "output_tokens": got})
    return rows


def _memory_fraction() -> float:
    """vLLM's CPU backend reserves gpu_memory_utilization (default 0.92) of the machine's memory
    and refuses to start when less is free, as on a machine shared with other work, whose use
    moves while vLLM starts: ask for a third of what is free now (plenty for a small model's KV),
    never more than its default."""
    info = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            info[key] = int(value.split()[0])
    return max(0.05, min(0.92, 0.3 * info["MemAvailable"] / info["MemTotal"]))


def run(req: dict) -> dict:
    import vllm
    from vllm import LLM, SamplingParams

    trace = req["trace"]
    longest = max(len(ids) + n for ids, n in trace)
    t0 = time.perf_counter()
    llm = LLM(model=req["model"], dtype=req["dtype"], skip_tokenizer_init=True, seed=0,
              max_num_seqs=req["max_num_seqs"], max_model_len=max(longest, 512),
              gpu_memory_utilization=_memory_fraction())
    load_s = time.perf_counter() - t0
    warm = [({"prompt_token_ids": ids[:16]}, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True,
                                                             detokenize=False)) for ids, _ in trace[:req["warmup"]]]
    llm.generate([w[0] for w in warm], [w[1] for w in warm], use_tqdm=False)
    result = {"load_s": load_s, "version": vllm.__version__,
              "settings": {"max_num_seqs": req["max_num_seqs"],
                           "gpu_memory_utilization": llm.llm_engine.vllm_config.cache_config.gpu_memory_utilization}}
    if req["mode"] == "single":
        with Clock() as clock:
            result["single"] = _single_stream(llm, SamplingParams, trace)
        result["output_tokens"] = sum(r["output_tokens"] for r in result["single"])
    else:
        prompts = [{"prompt_token_ids": ids} for ids, _ in trace]
        params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, detokenize=False) for _, n in trace]
        with Clock() as clock:
            outs = llm.generate(prompts, params, use_tqdm=False)
        result["output_tokens"] = sum(len(o.outputs[0].token_ids) for o in outs)
    result["elapsed_s"], result["cpu_s"] = clock.elapsed_s, clock.cpu_s
    return result


if __name__ == "__main__":
    sys.exit(run_worker(run, "vllm"))
