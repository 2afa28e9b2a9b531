"""`orcinus bench bf16`: is bfloat16 worth it for this model on this CPU?

Runs the reference prompts greedily in float32 and in bfloat16 and reports the end-to-end speed of
each and whether every prompt's greedy tokens agree. The verdict is stored per model and CPU
(`verdict_path`), and `dtype="auto"` on CPU chooses bfloat16 only where a stored verdict says
bf16 was both faster and in agreement (see orcinus/cpu_features.py): running the model twice at
every start-up would cost more than most runs save.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass

from orcinus.bench.report import cpu_model

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


@dataclass
class Bf16Verdict:
    model: str
    cpu: str
    float32_tok_s: float
    bfloat16_tok_s: float
    prompts: int
    agreeing_prompts: int  # prompts whose greedy tokens are identical in both dtypes

    @property
    def faster(self) -> bool:
        return self.bfloat16_tok_s > self.float32_tok_s

    @property
    def agrees(self) -> bool:
        return self.agreeing_prompts == self.prompts

    @property
    def use_bf16(self) -> bool:
        return self.faster and self.agrees


def verdict_path(model: str, cpu: str) -> str:
    root = os.environ.get("ORCINUS_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "orcinus"))
    key = hashlib.sha256(f"{os.path.abspath(model)}\n{cpu}".encode()).hexdigest()[:16]
    return os.path.join(root, "bf16", f"{key}.json")


def stored_verdict(model: str) -> Bf16Verdict | None:
    try:
        with open(verdict_path(model, cpu_model())) as f:
            return Bf16Verdict(**json.load(f))
    except (OSError, ValueError, TypeError):
        return None


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
        out = verdict_path(path, verdict.cpu)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out, "w") as f:
            json.dump(asdict(verdict), f, indent=2)
    return verdict
