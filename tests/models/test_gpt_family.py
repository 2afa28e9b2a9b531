"""GPT-2 and OPT variants beyond the shared matrix in test_models_vs_transformers.py: post-LN OPT
(opt-350m's layout), a GPT-2 checkpoint stored in bfloat16, headless checkpoints (tensor names
without the `transformer.` / `model.` prefix) and GPT-2's less common attention options."""
from __future__ import annotations

import os

import pytest
import torch

from checkpoints import build_checkpoint
from orcinus.engine.llm_engine import LLMEngine
from orcinus.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
PROMPTS = [[5, 17, 42, 9], [100, 3, 250, 7, 7, 60, 11, 300, 21], [77]]


def _save(model, folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder)


def _engine(folder: str, **kwargs) -> LLMEngine:
    # The reference is transformers in float32 on the CPU: pin both, whatever the host has.
    kwargs = {"dtype": "float32", "device": "cpu", **kwargs}
    return LLMEngine.from_kwargs(model=folder, skip_tokenizer_init=True, kv_cache_memory=1 << 22,
                                 block_size=8, **kwargs)


def _generate(engine: LLMEngine, prompts: list[list[int]]) -> list[list[int]]:
    """All prompts join at once, so initiations and increments share iterations."""
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", {"prompt_token_ids": p}, GREEDY)
    done: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = list(out.outputs[0].token_ids)
    return [done[f"r{i}"] for i in range(len(prompts))]


@torch.no_grad()
def _hf_generate(hf_model, prompt: list[int]) -> list[int]:
    out = hf_model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=5, min_new_tokens=5,
                            pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _first_logits(engine: LLMEngine, prompt: list[int]) -> torch.Tensor:
    """Last-position logits of the prompt's initiation iteration."""
    captured: list[torch.Tensor] = []
    original = engine.executor.driver_worker.runner.forward_logits

    def wrapped(inp):
        out = original(inp)
        captured.append(out.clone())
        return out

    engine.executor.driver_worker.runner.forward_logits = wrapped
    _generate(engine, [prompt])
    return captured[0][0]


@pytest.fixture(scope="module")
def post_ln_opt(tmp_path_factory):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                       word_embed_proj_dim=64, do_layer_norm_before=False, vocab_size=320,
                       max_position_embeddings=128, init_std=0.3, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = tf.OPTForCausalLM(cfg).eval()
    folder = str(tmp_path_factory.mktemp("opt-post-ln"))
    _save(model, folder)
    return folder, model


def test_post_ln_opt_greedy_matches_transformers(post_ln_opt):
    folder, hf_model = post_ln_opt
    engine = _engine(folder, dtype="float32")
    dec = engine.executor.driver_worker.runner.model.model  # the shared layout (models/causal_lm.py)
    assert dec.project_in is None and dec.project_out is None and dec.norm is None
    assert not dec.layers[0].pre_norm
    assert _generate(engine, PROMPTS) == [_hf_generate(hf_model, p) for p in PROMPTS]


def test_gpt2_bfloat16_checkpoint_runs_close_to_float32(tmp_path):
    folder = str(tmp_path / "gpt2-bf16")
    hf_model = build_checkpoint("gpt2", folder, dtype=torch.bfloat16)  # float32 copy of the bf16 weights
    engine = _engine(folder, dtype="bfloat16")
    assert engine.executor.driver_worker.runner.model.lm_head.weight.dtype == torch.bfloat16
    prompt = PROMPTS[1]
    got = _first_logits(engine, prompt)
    with torch.no_grad():
        ref = hf_model(torch.tensor([prompt])).logits[0, -1]
    # bfloat16 keeps ~3 significant digits; judge the error against the logits' own spread.
    assert torch.isfinite(got).all()
    assert (got - ref).abs().max() < 0.1 * ref.std() + 0.05
    assert torch.nn.functional.cosine_similarity(got, ref, dim=0) > 0.999


@pytest.mark.parametrize("arch", ["gpt2", "opt"])
def test_headless_checkpoint_loads(arch, tmp_path, checkpoint_factory):
    """GPT2Model / OPTModel checkpoints name tensors `h.0...` / `decoder...`; the LM head is tied."""
    _, hf_model = checkpoint_factory(arch)
    folder = str(tmp_path / arch)
    _save(hf_model.transformer if arch == "gpt2" else hf_model.model, folder)
    engine = _engine(folder, dtype="float32")
    got = _first_logits(engine, PROMPTS[0])
    with torch.no_grad():
        ref = hf_model(torch.tensor([PROMPTS[0]])).logits[0, -1]
    torch.testing.assert_close(got, ref, atol=2e-4, rtol=2e-4)


def test_gpt2_attention_options_match_transformers(tmp_path):
    """Per-layer score scaling, no 1/sqrt(d) scaling, a custom MLP width and exact GELU."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.GPT2Config(n_embd=64, n_layer=3, n_head=4, n_inner=96, vocab_size=320, n_positions=64,
                        initializer_range=0.1, activation_function="gelu", scale_attn_weights=False,
                        scale_attn_by_inverse_layer_idx=True, bos_token_id=1, eos_token_id=2)
    hf_model = tf.GPT2LMHeadModel(cfg).eval()
    _save(hf_model, str(tmp_path))
    engine = _engine(str(tmp_path), dtype="float32")
    assert _generate(engine, PROMPTS) == [_hf_generate(hf_model, p) for p in PROMPTS]
