"""Writing small GGUF files the way llama.cpp's converter lays them out, and loading them into
transformers (the independent reader every GGUF test compares with)."""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import torch

_GGUF_LAYER_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """The row order llama.cpp's converter writes for Q and K (pairs of rotary dims adjacent)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf_name: str) -> str:
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if hf_name in fixed:
        return fixed[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{_GGUF_LAYER_NAMES[module]}.{kind}"


def encode(w: np.ndarray, qtype, rng: np.random.Generator) -> np.ndarray:
    """`w` stored as `qtype`: gguf's own quantiser where it has one; for the k-quants (which gguf
    cannot quantise) random blocks with sane scales, since any bit pattern is a valid block."""
    import gguf
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T
    from gguf.quants import quantize

    if qtype in (T.F32,):
        return w.astype(np.float32)
    if qtype == T.F16:
        return w.astype(np.float16)
    if qtype in (T.Q8_0, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1):
        return quantize(w.astype(np.float32), qtype)
    block, size = GGML_QUANT_SIZES[qtype]
    rows, cols = w.shape
    assert cols % block == 0, f"k-quants need rows of a multiple of {block}, got {cols}"
    raw = rng.integers(0, 256, size=(rows * cols // block, size), dtype=np.uint8)

    def f16(x: np.ndarray) -> np.ndarray:
        return x.astype(np.float16).view(np.uint8).reshape(-1, 2)

    d = rng.uniform(0.5, 1.5, raw.shape[0])
    if qtype in (T.Q4_K, T.Q5_K):
        # d and dmin (f16) lead the block: w = d * scale * q - dmin * min with q in [0, 2^bits).
        # dmin = d * mean(q) centres the weights on zero, as real weights are; otherwise every
        # weight shares one sign and the tiny model's output collapses to a single token.
        mean_q = 7.5 if qtype == T.Q4_K else 15.5
        d = d * (2e-3 if qtype == T.Q4_K else 1e-3)
        raw[:, 0:2], raw[:, 2:4] = f16(d), f16(d * mean_q)
    elif qtype == T.Q6_K:  # d (f16) ends the block; scales and quants are signed already
        raw[:, size - 2:] = f16(d * 4e-4)
    else:
        raise ValueError(f"no encoder for {gguf.GGMLQuantizationType(qtype).name}")
    return raw.reshape(rows, -1)


def write_gguf(path: str, arch: str, hf_config, state: dict[str, torch.Tensor], permute: bool,
               extra: dict[str, np.ndarray] | None = None, qtypes: dict[str, object] | None = None,
               seed: int = 0, metadata: dict[str, str | float | int] | None = None) -> dict[str, np.ndarray]:
    """Write a checkpoint as llama.cpp's converter lays it out. `qtypes` maps an HF name to its
    storage type (default F32; 1-D tensors always F32, as llama.cpp keeps them). Returns what each
    GGUF tensor decodes to by `gguf.quants.dequantize`, in the file's own row order."""
    import gguf
    from gguf import GGMLQuantizationType as T
    from gguf.quants import dequantize

    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name("tiny-test")
    writer.add_block_count(hf_config.num_hidden_layers)
    writer.add_vocab_size(hf_config.vocab_size)  # transformers reads it here when the file has no vocabulary
    writer.add_context_length(hf_config.max_position_embeddings)
    writer.add_embedding_length(hf_config.hidden_size)
    writer.add_feed_forward_length(hf_config.intermediate_size)
    writer.add_head_count(hf_config.num_attention_heads)
    writer.add_head_count_kv(hf_config.num_key_value_heads)
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(hf_config.rms_norm_eps)
    writer.add_rope_freq_base(500000.0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_uint32("tokenizer.ggml.eot_token_id", 3)
    for key, value in (metadata or {}).items():  # "{arch}" in a key names the architecture
        key = key.format(arch=arch)
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_uint32(key, value)
    decoded: dict[str, np.ndarray] = {}
    for name, tensor in state.items():
        w = tensor.detach().float().numpy().copy()
        if permute and name.endswith(("q_proj.weight", "q_proj.bias")):
            w = llamacpp_permute(w, hf_config.num_attention_heads)
        if permute and name.endswith(("k_proj.weight", "k_proj.bias")):
            w = llamacpp_permute(w, hf_config.num_key_value_heads)
        qtype = (qtypes or {}).get(name, T.F32) if w.ndim == 2 else T.F32
        stored = encode(w, qtype, rng)
        if stored.dtype == np.uint8:
            writer.add_tensor(gguf_name(name), stored, raw_dtype=qtype)
            decoded[gguf_name(name)] = dequantize(stored, qtype).reshape(w.shape)
        else:
            writer.add_tensor(gguf_name(name), stored)
            decoded[gguf_name(name)] = stored.astype(np.float32)
    for name, w in (extra or {}).items():
        writer.add_tensor(name, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return decoded


def tiny_model(model_type: str, **overrides):
    """(transformers config, random state dict) of a tiny model; norms are not all ones so that a
    norm loaded in the wrong place shows."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  rms_norm_eps=1e-6, tie_word_embeddings=False)
    kwargs.update(overrides)
    config = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).float()
    state = {k: v for k, v in model.state_dict().items() if "rotary_emb" not in k}
    for k in state:
        if "norm" in k:
            state[k] = torch.rand_like(state[k]) + 0.5
    return config, state


def transformers_gguf_state_dict(path: str) -> dict[str, torch.Tensor]:
    """What transformers makes of a GGUF file (its own reader and dequantisation)."""
    return {k: v.detach() for k, v in transformers_gguf_model(path).state_dict().items()}


def transformers_gguf_model(path: str):
    """transformers' model from a GGUF file, float32, eval."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder, name = os.path.split(path)
    if importlib.util.find_spec("accelerate") is not None:
        return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    # from_pretrained insists on accelerate for GGUF; the function it calls underneath does not.
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").float()
    tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)["tensors"]
    state = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in tensors.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    assert set(missing) <= tied and not unexpected, (missing, unexpected)
    return model.eval()


def tame_q6_k(path: str) -> None:
    """gguf_files writes Q6_K as random blocks whose int8 sub-block scales make weights up to ~1.6:
    hidden states then reach the hundreds and every attention is saturated, so any rounding flips
    it. An eighth of each block's scale (exact in float16) gives a model in a sane range."""
    from gguf import GGMLQuantizationType as T

    from orcinus.models.gguf_loader import read_gguf_header

    header = read_gguf_header(path)
    with open(path, "r+b") as f:
        for t in header.tensors:
            if t.ggml_type != T.Q6_K:
                continue
            f.seek(t.offset)
            blocks = np.frombuffer(f.read(t.nbytes), dtype=np.uint8).reshape(-1, 210).copy()
            d = blocks[:, 208:].copy().view(np.float16)
            blocks[:, 208:] = (d * np.float16(0.125)).view(np.uint8)
            f.seek(t.offset)
            f.write(blocks.tobytes())
