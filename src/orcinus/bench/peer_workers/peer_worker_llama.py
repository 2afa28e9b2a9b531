"""`bench offline --backends llama-cpp`: the trace through `llama_cpp.Llama`, in its own interpreter.

Started by orcinus/bench/peers.py as `python peer_worker_llama.py REQUEST.json RESULT.json`
(protocol: peer_protocol.py, beside it); imports nothing of orcinus. It reads the same GGUF file orcinus
does, with its own quantized kernels. `llama_cpp.Llama` holds one sequence at a time, so the
batch mode runs the trace's requests one after another (its server batches; its Python API
does not): that is what a Python user of llama-cpp-python gets.
"""
from __future__ import annotations

import sys
import time

from peer_protocol import Clock, run_worker


def _one(llm, ids: list[int], n: int) -> tuple[float, float, int]:
    """Greedy, EOS ignored (`generate` does not stop at it): the first token's time, the last
    token's time (from the start) and the tokens produced."""
    t0 = time.perf_counter()
    first = last = 0.0
    got = 0
    for _ in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
        got += 1
        last = time.perf_counter() - t0
        if got == 1:
            first = last
        if got >= n:
            break
    return first, last, got


def _cpu_has_amx() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return "amx_int8" in f.read()
    except OSError:
        return False


def _without_extra_buffer_types(llama_cpp) -> None:
    """ggml's AMX matmul (an "extra buffer type", selected at load on CPUs with AMX) crashed with
    SIGSEGV in ggml_backend_amx_mul_mat on the first llama_decode of the default Q4_1 model (Intel
    Xeon VM with amx_int8, llama-cpp-python 0.3.36, 2026-12-04). The high-level `Llama` has no
    argument for `use_extra_bufts`, so the defaults it starts from are changed."""
    default = llama_cpp.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    llama_cpp.llama_model_default_params = params
    llama_cpp.llama.llama_cpp.llama_model_default_params = params


def run(req: dict) -> dict:
    import llama_cpp
    import llama_cpp.llama

    extra_bufts = req.get("llama_extra_bufts", "auto")
    use_extra = extra_bufts == "on" or (extra_bufts == "auto" and not _cpu_has_amx())
    if not use_extra:
        _without_extra_buffer_types(llama_cpp)

    trace = req["trace"]
    longest = max(len(ids) + n for ids, n in trace)
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=req["model"], n_ctx=max(512, longest + 8), n_batch=512,
                          n_threads=req["threads"], n_threads_batch=req["threads"], seed=0, verbose=False)
    load_s = time.perf_counter() - t0
    for ids, _ in trace[:req["warmup"]]:
        _one(llm, ids[:16], 4)
    result = {"load_s": load_s, "version": llama_cpp.__version__,
              "settings": {"n_threads": req["threads"], "requests": "one after another",
                           "use_extra_bufts": use_extra}}
    rows = []
    with Clock() as clock:
        for ids, n in trace:
            first, last, got = _one(llm, ids, n)
            rows.append({"ttft_s": first, "tpot_s": (last - first) / (got - 1) if got > 1 else float("nan"),
                         "output_tokens": got})
    if req["mode"] == "single":
        result["single"] = rows
    result["output_tokens"] = sum(r["output_tokens"] for r in rows)
    result["elapsed_s"], result["cpu_s"] = clock.elapsed_s, clock.cpu_s
    return result


if __name__ == "__main__":
    sys.exit(run_worker(run, "llama-cpp-python"))
