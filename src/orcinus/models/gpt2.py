"""GPT-2: learned absolute positions, LayerNorm, a plain GELU MLP, biases everywhere, a tied LM head.

Checkpoints store every linear as `Conv1D`, [in, out] with q/k/v fused in `c_attn`; they load
into the shared blocks' [out, in] parameters through transposed views (q/k/v as three parts), so
tensor parallelism reads only each rank's rows and columns as for every other family.
"""
from __future__ import annotations

import torch
from torch import nn

from orcinus.config import ModelConfig
from orcinus.layers.decoder_layer import DecoderLayer
from orcinus.layers.mlp import MLP
from orcinus.layers.pipeline import on_first_stage, on_last_stage
from orcinus.layers.self_attention import SelfAttention
from orcinus.models.causal_lm import DecoderLM
from orcinus.models.hf_config import UnsupportedModel, eos_ids
from orcinus.models.weights import Part, Target, Transposed

# checkpoint module (inside a layer) -> this layout's module; all Conv1D, [in, out]
_LAYER_MODULES = {"ln_1": "input_layernorm", "ln_2": "post_attention_layernorm", "attn.c_proj": "self_attn.o_proj",
                  "mlp.c_fc": "mlp.up_proj", "mlp.c_proj": "mlp.down_proj"}
_TOP = {"wte.": "model.embed_tokens.", "wpe.": "model.embed_positions.", "ln_f.": "model.norm.", "h.": "model.layers."}


class GPT2LMHeadModel(DecoderLM):
    def __init__(self, cfg: ModelConfig) -> None:
        scale = cfg.head_dim ** -0.5 if cfg.extra.get("scale_attn_weights", True) else 1.0

        def layer(i: int, kv_index: int) -> DecoderLayer:
            # scale_attn_by_inverse_layer_idx: a per-layer constant, folded into the softmax scale
            s = scale / (i + 1) if cfg.extra.get("scale_attn_by_inverse_layer_idx", False) else scale
            attn = SelfAttention(cfg.hidden_size, cfg.num_heads, cfg.num_heads, cfg.head_dim, kv_index,
                                 qkv_bias=True, out_bias=True, scale=s)
            return DecoderLayer(attn, MLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act), _layer_norm(cfg),
                                _layer_norm(cfg))

        super().__init__(cfg, layer)
        self.model.embed_positions = on_first_stage(lambda: nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size))
        self.model.norm = on_last_stage(lambda: _layer_norm(cfg))

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # Positions are per request (the runner restarts them at each request's context length),
        # so one gather gives every token of the mixed batch its own learned position embedding.
        return self.model.embed_tokens(input_ids) + self.model.embed_positions(positions)

    def rename(self, name: str) -> str | None:
        # GPT2Model (rather than GPT2LMHeadModel) checkpoints name tensors without `transformer.`.
        name = name.removeprefix("transformer.")
        parts = name.split(".")
        # attn.bias / attn.masked_bias are the causal-mask buffers older checkpoints saved.
        if len(parts) >= 2 and parts[-2] == "attn" and parts[-1] in ("bias", "masked_bias"):
            return None
        for old, new in _TOP.items():
            if name.startswith(old):
                return new + name[len(old):]
        return name

    def layer_targets(self, prefix: str, module: str, param: str) -> list[Target]:
        view = Transposed if param == "weight" and not module.startswith("ln_") else None
        if module == "attn.c_attn":  # q, k, v side by side
            return [Target(f"{prefix}.self_attn.qkv_proj.{param}", part,
                           lambda t, part=part: Part(view(t) if view else t, part, 3)) for part in range(3)]
        return [Target(f"{prefix}.{_LAYER_MODULES.get(module, module)}.{param}", None, view)]


def _layer_norm(cfg: ModelConfig) -> nn.LayerNorm:
    return nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


def parse_gpt2_config(hf: dict) -> ModelConfig:
    if hf.get("add_cross_attention"):
        raise UnsupportedModel("GPT-2 with cross-attention (an encoder-decoder setup) is not supported")
    # Saved configs use GPT-2's own names; accept the generic aliases too.
    hidden = hf.get("n_embd") or hf["hidden_size"]
    num_heads = hf.get("n_head") or hf["num_attention_heads"]
    return ModelConfig(
        architecture="gpt2",
        vocab_size=hf["vocab_size"],
        hidden_size=hidden,
        num_layers=hf.get("n_layer") or hf["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=num_heads,
        head_dim=hidden // num_heads,
        intermediate_size=hf.get("n_inner") or 4 * hidden,
        max_position_embeddings=hf.get("n_positions") or hf.get("n_ctx") or hf.get("max_position_embeddings", 1024),
        layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        hidden_act=hf.get("activation_function", "gelu_new"),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=eos_ids(hf),
        extra={
            "scale_attn_weights": bool(hf.get("scale_attn_weights", True)),
            "scale_attn_by_inverse_layer_idx": bool(hf.get("scale_attn_by_inverse_layer_idx", False)),
        },
    )
