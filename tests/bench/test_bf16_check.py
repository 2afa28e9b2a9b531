"""`orcinus bench bf16`'s agreement check: float32 vs bfloat16 greedy tokens per prompt, stored
per model and CPU for dtype=auto to follow."""
from __future__ import annotations

from orcinus.bench.bf16_check import check_bf16, stored_verdict


def test_check_counts_agreeing_prompts_and_stores_the_verdict(checkpoint_factory, tmp_path, monkeypatch):
    monkeypatch.setenv("ORCINUS_CACHE", str(tmp_path))
    folder, _ = checkpoint_factory("llama")
    prompts = [{"prompt_token_ids": [3, 4, 5, 6]}, {"prompt_token_ids": [7, 8]}, {"prompt_token_ids": [9]}]
    v = check_bf16(folder, prompts, max_tokens=6)
    assert v.prompts == 3 and 0 <= v.agreeing_prompts <= 3
    assert v.float32_tok_s > 0 and v.bfloat16_tok_s > 0
    stored = stored_verdict(folder)
    assert stored == v


def test_identical_runs_agree_on_every_prompt(checkpoint_factory, tmp_path, monkeypatch):
    # The comparison itself: float32 against float32 must agree everywhere (and is not stored).
    import orcinus.bench.bf16_check as mod

    monkeypatch.setenv("ORCINUS_CACHE", str(tmp_path))
    real = mod._greedy
    monkeypatch.setattr(mod, "_greedy", lambda model, dtype, p, n: real(model, "float32", p, n))
    folder, _ = checkpoint_factory("llama")
    v = check_bf16(folder, [{"prompt_token_ids": [3, 4, 5]}, {"prompt_token_ids": [6]}], max_tokens=5, store=False)
    assert v.agrees and v.agreeing_prompts == 2
    assert stored_verdict(folder) is None
