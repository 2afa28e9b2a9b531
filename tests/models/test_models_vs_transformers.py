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
    # Each forward's rows, in order, as the scheduler made its batches (the engine launches the
    # next iteration before a step returns, so batches are recorded where they are made).
    batches: list[list[str]] = []
    schedule = engine.scheduler.schedule

    def recording_schedule():
        batch = schedule()
        if batch is not None and batch.requests:
            batches.append([r.request_id for r in batch.requests])
        return batch

    engine.scheduler.schedule = recording_schedule
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 320, (n,), generator=g).tolist() for n in (5, 37, 12, 30, 1)]
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    # First three initiations; later their increments mixed with two newcomers.
    for i in range(3):
        engine.add_request(f"r{i}", {"prompt_token_ids": prompts[i]}, greedy)
    engine.step()
    for i in range(3, 5):
        engine.add_request(f"r{i}", {"prompt_token_ids": prompts[i]}, greedy)
    outputs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out.outputs[0].token_ids
    assert engine.free_all_check()
    # Every request's per-iteration logits equal transformers' logits at the same positions.
    step_of: dict[str, int] = {}
    assert len(batches) == len(logits)
    assert batches[0] == ["r0", "r1", "r2"]
    mixed = next(b for b in batches if "r3" in b)
    assert sorted(mixed) == ["r0", "r1", "r2", "r3", "r4"]  # 3 increments + 2 initiations in one batch
    for batch, lg in zip(batches, logits):
        assert lg.shape[0] == len(batch)
        for row, rid in enumerate(batch):
            k = step_of.get(rid, 0)
            step_of[rid] = k + 1
            i = int(rid[1:])
            seq = prompts[i] + outputs[rid][:k]
            ref = _reference_logits(hf_model, seq)[-1]
            torch.testing.assert_close(lg[row], ref, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_an_iteration_longer_than_the_cpu_row_chunk_matches_transformers(arch, checkpoint_factory):
    """Five 450-token prompts in one iteration: 2,250 rows, so the MLPs run in row chunks
    (layers/row_chunks.py) and the weights in their CPU layout; every prompt's last logits equal
    transformers'."""
    folder, hf_model = checkpoint_factory(arch)
    engine = LLMEngine.from_kwargs(model=folder, skip_tokenizer_init=True, dtype="float32", device="cpu",
                                   kv_cache_memory=1 << 22, max_num_batched_tokens=4096)
    logits = capture_logits(engine)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 320, (450,), generator=g).tolist() for _ in range(5)]
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", {"prompt_token_ids": prompt}, SamplingParams(temperature=0.0, max_tokens=1))
    while engine.has_unfinished_requests():
        engine.step()
    assert logits[0].shape[0] == 5  # all five prefills in the first iteration
    for row, prompt in enumerate(prompts):
        torch.testing.assert_close(logits[0][row], _reference_logits(hf_model, prompt)[-1], atol=2e-4, rtol=2e-4)


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
