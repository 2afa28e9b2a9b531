"""`orcinus bench bf16`: is bfloat16 worth it for this model on this CPU?

Runs the reference prompts greedily in float32 and in bfloat16 and reports the end-to-end speed of
each and whether every prompt's greedy tokens agree. The verdict is stored per model and CPU
(`orcinus.cpu_features.verdict_path`), and `dtype="auto"` on CPU chooses bfloat16 only where a stored verdict says
bf16 was both faster and in agreement (see orcinus/cpu_features.py): running the model twice at
every start-up would cost more than most runs save.
"""
from __future__ import annotations

import time

# The verdict and its store live in cpu_features (read when resolving dtype="auto"); re-exported.
from orcinus.cpu_features import Bf16Verdict, cpu_model, store_verdict, stored_verdict, verdict_path  # noqa: F401

REFERENCE_PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "def fibonacci(n):",
    "Explain in one sentence why the sky is blue.",
    "List three prime numbers:",
    "Once upon a time, in a small village,",
    "Translate to French: Good morning, how are you?",
    "The quick brown fox",
]


def _greedy(model: str, dtype: str, prompts: list, max_tokens: int) -> tuple[list[list[int]], float]:
    from orcinus.engine.llm import LLM
    from orcinus.sampling_params import SamplingParams

    llm = LLM(model=model, dtype=dtype, device="cpu")
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=2), use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    return tokens, sum(map(len, tokens)) / elapsed


def check_bf16(model: str | None, prompts: list = REFERENCE_PROMPTS, max_tokens: int = 32,
               store: bool = True) -> Bf16Verdict:
    from orcinus.models.loader import resolve_model_path

    path = resolve_model_path(model)
    ref, fp32_rate = _greedy(path, "float32", prompts, max_tokens)
    got, bf16_rate = _greedy(path, "bfloat16", prompts, max_tokens)
    verdict = Bf16Verdict(path, cpu_model(), fp32_rate, bf16_rate, len(prompts),
                          sum(a == b for a, b in zip(ref, got)))
    if store:
        store_verdict(verdict)
    return verdict
