"""Log-probs from the engine equal transformers' at every generated position: the chosen token's
and the top-k alternatives (ids and values), for greedy and for sampled tokens, in a batch."""
from __future__ import annotations

import pytest
import torch

from orcinus.engine.llm import LLM
from orcinus.sampling_params import SamplingParams
from references import reference_logprobs

K = 5


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt2"])
def test_logprobs_at_every_position_match_transformers(arch, checkpoint_factory):
    folder, hf_model = checkpoint_factory(arch)
    llm = LLM(folder, skip_tokenizer_init=True, dtype="float32", device="cpu", kv_cache_memory=1 << 22, block_size=4)
    prompts = [[5, 9, 11, 40, 7], [100, 3, 250, 17, 18, 19, 60, 61, 62]]
    params = [SamplingParams(max_tokens=10, logprobs=K, temperature=0.0, ignore_eos=True),
              SamplingParams(max_tokens=10, logprobs=K, temperature=1.0, seed=3, ignore_eos=True)]
    for params_i in params:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params_i, use_tqdm=False)
        for p, out in zip(prompts, outs):
            c = out.outputs[0]
            assert len(c.logprobs) == len(c.token_ids) == 10
            ref = reference_logprobs(hf_model, p, c.token_ids)
            total = 0.0
            for pos, (tok, entry) in enumerate(zip(c.token_ids, c.logprobs)):
                assert entry[tok].logprob == pytest.approx(float(ref[pos, tok]), abs=1e-4), pos
                total += entry[tok].logprob
                top = torch.topk(ref[pos], K)
                alternatives = {t: lp for t, lp in entry.items() if t != tok or tok in top.indices.tolist()}
                assert set(alternatives) == set(top.indices.tolist()), pos
                for t, v in zip(top.indices.tolist(), top.values.tolist()):
                    assert entry[t].logprob == pytest.approx(v, abs=1e-4), (pos, t)
            assert c.cumulative_logprob == pytest.approx(total, abs=1e-3)
