"""Small random-weight checkpoints built through transformers (the oracle for every model)."""
from __future__ import annotations

import os

import torch

ARCHS = ["llama", "llama_tied", "mistral", "qwen2", "qwen3", "gpt2", "opt"]


def hf_config(arch: str):
    import transformers as tf

    common = dict(vocab_size=320, max_position_embeddings=512, initializer_range=0.3)
    if arch in ("llama", "llama_tied"):
        return tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, tie_word_embeddings=arch == "llama_tied",
                              bos_token_id=1, eos_token_id=2, **common)
    if arch == "mistral":
        return tf.MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=1, sliding_window=24, bos_token_id=1, eos_token_id=2, **common)
    if arch == "qwen2":
        return tf.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                              **common)
    if arch == "qwen3":
        return tf.Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=32, tie_word_embeddings=True, bos_token_id=1,
                              eos_token_id=2, **common)
    if arch == "gpt2":
        return tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=320, n_positions=512,
                             initializer_range=0.3, bos_token_id=1, eos_token_id=2)
    if arch == "opt":
        return tf.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                            word_embed_proj_dim=32, vocab_size=320, max_position_embeddings=512,
                            init_std=0.3, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    raise ValueError(arch)


def build_checkpoint(arch: str, folder: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """Save a random-weight model to `folder`; returns the transformers model (eval, float32)."""
    return build_from_config(hf_config(arch), folder, seed, dtype)


def build_from_config(cfg, folder: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """Save a random-weight model of a transformers config to `folder`; returns it (eval, float32)."""
    import transformers as tf

    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    os.makedirs(folder, exist_ok=True)
    model.to(dtype).save_pretrained(folder)
    return model.float()
