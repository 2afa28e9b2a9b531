"""The Llama family: Llama 2/3, Mistral, SmolLM2, Qwen2 (q/k/v bias) and Qwen3 (q/k RMSNorm).

Pre-norm decoder layers (RMSNorm) with rotary self-attention and a gated MLP, all shared blocks
from `orcinus.layers`; checkpoint names are already the shared layout's (`DecoderLM`).
"""
from __future__ import annotations

from orcinus.config import ModelConfig
from orcinus.layers.decoder_layer import DecoderLayer
from orcinus.layers.mlp import GatedMLP
from orcinus.layers.norms import RMSNorm
from orcinus.layers.pipeline import on_last_stage
from orcinus.layers.rotary import RotaryEmbedding, UnsupportedRopeScaling, check_rope_scaling
from orcinus.layers.self_attention import SelfAttention
from orcinus.models.causal_lm import DecoderLM
from orcinus.models.hf_config import UnsupportedModel, eos_ids, sliding_window


class LlamaForCausalLM(DecoderLM):
    def __init__(self, cfg: ModelConfig) -> None:
        rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)
        # Qwen2/3 slide only in some layers (`full_attention_layers`, model-wide indices); Mistral in all.
        full = cfg.extra.get("full_attention_layers", ())

        def layer(i: int, kv_index: int) -> DecoderLayer:
            attn = SelfAttention(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, kv_index,
                                 qkv_bias=cfg.attention_bias, out_bias=False, rotary=rotary,
                                 sliding_window=None if i in full else cfg.sliding_window,
                                 qk_norm_eps=cfg.rms_norm_eps if cfg.qk_norm else None)
            return DecoderLayer(attn, GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act),
                                RMSNorm(cfg.hidden_size, cfg.rms_norm_eps), RMSNorm(cfg.hidden_size, cfg.rms_norm_eps))

        super().__init__(cfg, layer)
        self.model.rotary = rotary  # in the module tree so that its tables follow the model's device
        self.model.norm = on_last_stage(lambda: RMSNorm(cfg.hidden_size, cfg.rms_norm_eps))


def parse_llama_config(hf: dict) -> ModelConfig:
    model_type = hf.get("model_type", "llama")
    num_heads = hf["num_attention_heads"]
    window, full_layers = sliding_window(hf, model_type)
    rope_params = hf.get("rope_parameters") or {}
    rope_theta = hf.get("rope_theta")
    if rope_theta is None:
        rope_theta = rope_params.get("rope_theta", 10000.0)
    scaling = hf.get("rope_scaling") or (rope_params if rope_params.get("rope_type", "default") != "default" else None)
    try:
        check_rope_scaling(scaling)
    except UnsupportedRopeScaling as e:
        raise UnsupportedModel(str(e)) from e
    return ModelConfig(
        architecture=model_type,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
        intermediate_size=hf["intermediate_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope_theta),
        rope_scaling=scaling,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=bool(hf.get("attention_bias", model_type == "qwen2")),
        qk_norm=model_type == "qwen3",
        hidden_act=hf.get("hidden_act", "silu"),
        sliding_window=window,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=eos_ids(hf),
        extra={"full_attention_layers": full_layers},
    )
