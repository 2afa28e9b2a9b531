"""orcinus's logits equal transformers' on the same random-weight checkpoint, for a mixed batch
of initiation and increment requests in one flattened iteration."""
from __future__ import annotations

import pytest
import torch

from checkpoints import ARCHS
from orcinus.engine.llm_engine import LLMEngine
from orcinus.sampling_params import SamplingParams
from references import capture_logits


@torch.no_grad()
def _reference_logits(hf_model, token_ids: list[int]) -> torch.Tensor:
    return hf_model(torch.tensor([token_ids])).logits[0].float()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_mixed_batch_logits_match_transformers(arch, backend, checkpoint_factory):
    folder, hf_model = checkpoint_factory(arch)
    engine = LLMEngine.from_kwargs(model=folder, skip_tokenizer_init=True, dtype="float32", device="cpu", kv_cache_memory=1 << 22,
                                   block_size=8, attention_backend=backend)
    logits = capture_logits(engine)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 320, (n,), generator=g).tolist() for n in (5, 37, 12, 30, 1)]
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    # Iteration 1: three initiations. Iteration 2+: their increments mixed with two newcomers.
    for i in range(3):
        engine.add_request(f"r{i}", {"prompt_token_ids": prompts[i]}, greedy)
    engine.step()
    for i in range(3, 5):
        engine.add_request(f"r{i}", {"prompt_token_ids": prompts[i]}, greedy)
    outputs = {}
    batches = [[f"r{i}" for i in range(3)]]
    while engine.has_unfinished_requests():
        batch = [r.request_id for r in engine.scheduler.pool.values()]
        batches.append(batch)
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out.outputs[0].token_ids
    assert engine.free_all_check()
    # Every request's per-iteration logits equal transformers' logits at the same positions.
    step_of: dict[str, int] = {}
    for it, (batch, lg) in enumerate(zip(batches, logits)):
        assert lg.shape[0] == len(batch)
        if it == 1:
            assert len(batch) == 5  # the mixed iteration: 3 increments + 2 initiations
        for row, rid in enumerate(batch):
            k = step_of.get(rid, 0)
            step_of[rid] = k + 1
            i = int(rid[1:])
            seq = prompts[i] + outputs[rid][:k]
            ref = _reference_logits(hf_model, seq)[-1]
            torch.testing.assert_close(lg[row], ref, atol=2e-4, rtol=2e-4)


def test_unsupported_architecture_is_a_clear_error(tmp_path):
    import json

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba", "architectures": ["MambaForCausalLM"]}))
    from orcinus.models.registry import UnsupportedModel

    with pytest.raises(UnsupportedModel, match="llama"):
        LLMEngine.from_kwargs(model=str(tmp_path), skip_tokenizer_init=True, dtype="float32")


def test_missing_model_is_a_clear_error(tmp_path):
    from orcinus.models.loader import ModelNotFound

    with pytest.raises(ModelNotFound, match="does not exist"):
        LLMEngine.from_kwargs(model=str(tmp_path / "nope"), skip_tokenizer_init=True, dtype="float32")
