"""OPT: learned positions offset by 2, LayerNorm before (most sizes) or after (opt-350m) each
sublayer, a plain ReLU MLP, biases everywhere, and projections when the word embeddings are
narrower than the model (the hidden states between pipeline stages are always model-wide).
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
from orcinus.models.hf_config import eos_ids
from orcinus.models.weights import Target

# checkpoint module (inside a layer) -> this layout's module; q/k/v as in DecoderLM.MERGED_PARTS
_LAYER_MODULES = {"self_attn.out_proj": "self_attn.o_proj", "fc1": "mlp.up_proj", "fc2": "mlp.down_proj",
                  "self_attn_layer_norm": "input_layernorm", "final_layer_norm": "post_attention_layernorm"}


class OPTForCausalLM(DecoderLM):
    def __init__(self, cfg: ModelConfig) -> None:
        h, bias = cfg.hidden_size, cfg.attention_bias

        def layer(i: int, kv_index: int) -> DecoderLayer:
            # HF multiplies q_proj's output by head_dim**-0.5; scaling the scores instead is the same.
            attn = SelfAttention(h, cfg.num_heads, cfg.num_heads, cfg.head_dim, kv_index, qkv_bias=bias, out_bias=bias)
            return DecoderLayer(attn, MLP(h, cfg.intermediate_size, cfg.hidden_act, bias), _layer_norm(cfg),
                                _layer_norm(cfg), pre_norm=cfg.do_layer_norm_before)

        embed_dim = cfg.word_embed_proj_dim or h
        super().__init__(cfg, layer, embed_dim)
        # The table has position_offset extra rows: position p lives at row p + offset.
        self.model.embed_positions = on_first_stage(
            lambda: nn.Embedding(cfg.max_position_embeddings + cfg.position_offset, h))
        narrow = embed_dim != h
        self.model.project_in = on_first_stage(lambda: nn.Linear(embed_dim, h, bias=False)) if narrow else None
        self.model.project_out = on_last_stage(lambda: nn.Linear(h, embed_dim, bias=False)) if narrow else None
        # Post-LN models already end in a norm; some old pre-LN checkpoints lack this one.
        if cfg.do_layer_norm_before and not cfg.extra.get("remove_final_layer_norm", False):
            self.model.norm = on_last_stage(lambda: _layer_norm(cfg))

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        if self.model.project_in is not None:
            x = self.model.project_in(x)
        return x + self.model.embed_positions(positions + self.config.position_offset)

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        x = super().finish(x)
        # back to the embedding width the tied LM head expects
        return self.model.project_out(x) if self.model.project_out is not None else x

    def rename(self, name: str) -> str | None:
        # OPTModel checkpoints (e.g. some facebook/opt-* files) name tensors `decoder.…`.
        name = "model." + name.removeprefix("model.").removeprefix("decoder.")
        if name.startswith("model.lm_head."):
            name = name.removeprefix("model.")
        return name.replace("model.final_layer_norm.", "model.norm.", 1)

    def layer_targets(self, prefix: str, module: str, param: str) -> list[Target]:
        if module in _LAYER_MODULES:
            return [Target(f"{prefix}.{_LAYER_MODULES[module]}.{param}")]
        return super().layer_targets(prefix, module, param)


def _layer_norm(cfg: ModelConfig) -> nn.LayerNorm:
    return nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps,
                        elementwise_affine=cfg.extra.get("layer_norm_elementwise_affine", True))


def parse_opt_config(hf: dict) -> ModelConfig:
    hidden, num_heads = hf["hidden_size"], hf["num_attention_heads"]
    return ModelConfig(
        architecture="opt",
        vocab_size=hf["vocab_size"],
        hidden_size=hidden,
        num_layers=hf["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=num_heads,
        head_dim=hidden // num_heads,
        intermediate_size=hf["ffn_dim"],
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        layer_norm_eps=1e-5,  # OPT uses nn.LayerNorm's default; the config has no field for it
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        attention_bias=bool(hf.get("enable_bias", True)),  # OPT's one switch for every Linear's bias
        hidden_act=hf.get("activation_function", "relu"),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=eos_ids(hf),
        do_layer_norm_before=bool(hf.get("do_layer_norm_before", True)),
        word_embed_proj_dim=hf.get("word_embed_proj_dim") or hidden,
        position_offset=2,
        extra={
            "layer_norm_elementwise_affine": bool(hf.get("layer_norm_elementwise_affine", True)),
            "remove_final_layer_norm": bool(hf.get("_remove_final_layer_norm", False)),
        },
    )
