"""RoPE scaling and per-layer sliding windows in the forward pass, against transformers.

Each checkpoint is a tiny random-weight model saved by transformers with one rope_scaling kind (or
Qwen2's `use_sliding_window`); orcinus's logits at every generated position must equal transformers'
logits for the same sequence. Prompts run past every scaling's original context and past the window,
where the schemes differ from plain RoPE.
"""
from __future__ import annotations

import json

import pytest
import torch

from checkpoints import build_from_config
from orcinus.engine.llm_engine import LLMEngine
from orcinus.models.registry import UnsupportedModel
from orcinus.sampling_params import SamplingParams
from references import capture_logits

_ROPE = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    "yarn_mscale": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 16,
                    "beta_slow": 2, "mscale": 1.0, "mscale_all_dim": 0.5, "truncate": False},
}


def _llama(rope: dict | None):
    import transformers as tf

    params = {"rope_theta": 10000.0, **(rope or {"rope_type": "default"})}
    return tf.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                          initializer_range=0.3, rope_parameters=params, bos_token_id=1, eos_token_id=2)


def _qwen2_window(**kw):
    import transformers as tf

    return tf.Qwen2Config(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                          initializer_range=0.3, bos_token_id=1, eos_token_id=2, **kw)


def _logits_every_position_match(folder: str, hf_model, prompt_len: int, max_new: int = 6) -> None:
    engine = LLMEngine.from_kwargs(model=folder, skip_tokenizer_init=True, dtype="float32", device="cpu",
                                   kv_cache_memory=1 << 23, block_size=8, attention_backend="reference")
    captured = capture_logits(engine)
    prompt = torch.randint(3, 320, (prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    engine.add_request("r", {"prompt_token_ids": prompt},
                       SamplingParams(temperature=0.0, max_tokens=max_new, ignore_eos=True))
    out = None
    while engine.has_unfinished_requests():
        for o in engine.step():
            out = o
    tokens = out.outputs[0].token_ids
    assert len(captured) == max_new == len(tokens)
    with torch.no_grad():  # one forward over the whole sequence gives the reference at every position
        ref = hf_model(torch.tensor([prompt + tokens[:-1]])).logits[0, prompt_len - 1:].float()
    for i, lg in enumerate(captured):
        torch.testing.assert_close(lg[0], ref[i], atol=2e-4, rtol=2e-4, msg=f"generated position {i}")


@pytest.mark.parametrize("kind", sorted(_ROPE))
def test_rope_scaling_logits_match_transformers(kind: str, tmp_path) -> None:
    folder = str(tmp_path / kind)
    hf_model = build_from_config(_llama(_ROPE[kind]), folder)
    saved = json.loads((tmp_path / kind / "config.json").read_text())
    assert (saved.get("rope_parameters") or saved.get("rope_scaling"))["rope_type"] == _ROPE[kind]["rope_type"]
    _logits_every_position_match(folder, hf_model, prompt_len=150)


def test_scaling_changes_the_logits(tmp_path) -> None:
    """The comparison above can fail: the same weights without scaling give other logits."""
    scaled = build_from_config(_llama(_ROPE["yarn"]), str(tmp_path / "a"))
    build_from_config(_llama(None), str(tmp_path / "b"))
    with pytest.raises(AssertionError):
        _logits_every_position_match(str(tmp_path / "b"), scaled, prompt_len=150, max_new=1)


@pytest.mark.parametrize("kind", ["longrope", "su", "made-up"])
def test_unsupported_rope_scaling_is_refused_at_load(kind: str, tmp_path) -> None:
    build_from_config(_llama(None), str(tmp_path))
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    cfg["rope_scaling"] = {"rope_type": kind, "factor": 2.0, "short_factor": [1.0] * 8, "long_factor": [1.0] * 8,
                           "original_max_position_embeddings": 64}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModel, match=rf"rope scaling '{kind}' is not supported.*linear, dynamic, llama3, yarn"):
        LLMEngine.from_kwargs(model=str(tmp_path), skip_tokenizer_init=True, dtype="float32", device="cpu")


@pytest.mark.parametrize("max_window_layers", [0, 1, 3])
def test_qwen2_sliding_window_layers_match_transformers(max_window_layers: int, tmp_path) -> None:
    """Layers from max_window_layers on see the last 16 tokens only; the rest see everything."""
    hf_model = build_from_config(_qwen2_window(use_sliding_window=True, sliding_window=16,
                                               max_window_layers=max_window_layers), str(tmp_path))
    assert hf_model.config.layer_types.count("sliding_attention") == 3 - max_window_layers
    _logits_every_position_match(str(tmp_path), hf_model, prompt_len=40)


def test_qwen2_window_from_an_old_config_without_layer_types(tmp_path) -> None:
    """Checkpoints saved before transformers wrote `layer_types` give only max_window_layers."""
    hf_model = build_from_config(_qwen2_window(use_sliding_window=True, sliding_window=16, max_window_layers=1),
                                 str(tmp_path))
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["layer_types"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    _logits_every_position_match(str(tmp_path), hf_model, prompt_len=40)


def test_qwen2_window_off_attends_to_everything(tmp_path) -> None:
    hf_model = build_from_config(_qwen2_window(use_sliding_window=False, sliding_window=16), str(tmp_path))
    _logits_every_position_match(str(tmp_path), hf_model, prompt_len=40)


def test_unknown_layer_types_are_refused_at_load(tmp_path) -> None:
    build_from_config(_qwen2_window(use_sliding_window=True, sliding_window=16, max_window_layers=1), str(tmp_path))
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["layer_types"] = ["full_attention", "chunked_attention", "sliding_attention"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModel, match="chunked_attention"):
        LLMEngine.from_kwargs(model=str(tmp_path), skip_tokenizer_init=True, dtype="float32", device="cpu")
