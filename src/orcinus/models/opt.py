"""OPT: learned positions offset by 2, LayerNorm before (most sizes) or after (opt-350m) each
sublayer, and optional projections when the word embeddings are narrower than the model.

All ops run on the flat [num_tokens, hidden] tensor of the iteration; only `PagedAttention` looks
at which token belongs to which request. Parameter names follow the Hugging Face checkpoints.
"""
from __future__ import annotations

import torch
from torch import nn

from orcinus.config import ModelConfig
from orcinus.layers.activations import get_activation
from orcinus.layers.attention import PagedAttention
from orcinus.distributed.parallel_state import even_split
from orcinus.layers.context import ForwardContext
from orcinus.layers.linear import (ColumnParallelLinear, MergedColumnParallelLinear, ParallelLMHead,
                                   RowParallelLinear, VocabParallelEmbedding)
from orcinus.layers.row_chunks import in_row_chunks
from orcinus.models.registry import _eos_ids


def _layer_norm(cfg: ModelConfig) -> nn.LayerNorm:
    return nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps,
                        elementwise_affine=cfg.extra.get("layer_norm_elementwise_affine", True))


class OPTAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        h, bias = cfg.hidden_size, cfg.attention_bias
        heads = even_split(cfg.num_heads, "the number of attention heads")  # on this tensor-parallel rank
        # q, k and v in one GEMM; the checkpoint's q_proj/k_proj/v_proj load into its parts.
        self.qkv_proj = MergedColumnParallelLinear(h, [(h, None)] * 3, bias=bias)
        self.out_proj = RowParallelLinear(h, h, bias)
        # HF multiplies q_proj's output by head_dim**-0.5; scaling the scores instead is the same.
        self.attn = PagedAttention(layer_idx, heads, heads, cfg.head_dim, cfg.head_dim ** -0.5)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        q, k, v = self.qkv_proj.split(self.qkv_proj(x))
        return self.out_proj(self.attn(q, k, v, ctx))


class OPTDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.pre_ln = cfg.do_layer_norm_before
        self.self_attn = OPTAttention(cfg, layer_idx)
        self.self_attn_layer_norm = _layer_norm(cfg)
        even_split(cfg.intermediate_size, "the MLP's ffn_dim")
        self.fc1 = ColumnParallelLinear(cfg.hidden_size, cfg.intermediate_size, cfg.attention_bias)
        self.fc2 = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, cfg.attention_bias)
        self.final_layer_norm = _layer_norm(cfg)
        self.act = get_activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        if self.pre_ln:
            x = x + self.self_attn(self.self_attn_layer_norm(x), ctx)
            return x + in_row_chunks(self._mlp, self.final_layer_norm(x))
        # Post-LN (opt-350m): normalise after each residual add instead.
        x = self.self_attn_layer_norm(x + self.self_attn(x, ctx))
        return self.final_layer_norm(x + in_row_chunks(self._mlp, x))

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class OPTDecoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        embed_dim = cfg.word_embed_proj_dim or cfg.hidden_size
        self.embed_dim = embed_dim
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, embed_dim)
        # The table has position_offset extra rows: position p lives at row p + offset.
        self.embed_positions = nn.Embedding(cfg.max_position_embeddings + cfg.position_offset, cfg.hidden_size)
        self.project_in = self.project_out = None
        if embed_dim != cfg.hidden_size:
            self.project_in = nn.Linear(embed_dim, cfg.hidden_size, bias=False)
            self.project_out = nn.Linear(cfg.hidden_size, embed_dim, bias=False)
        self.layers = nn.ModuleList(OPTDecoderLayer(cfg, i) for i in range(cfg.num_layers))
        # Post-LN models already end in a norm; some old pre-LN checkpoints lack this one.
        self.final_layer_norm = None
        if cfg.do_layer_norm_before and not cfg.extra.get("remove_final_layer_norm", False):
            self.final_layer_norm = _layer_norm(cfg)


class OPTModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.decoder = OPTDecoder(cfg)


class OPTForCausalLM(nn.Module):
    supports_tensor_parallel = True

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = OPTModel(cfg)
        dec = self.model.decoder
        self.lm_head = ParallelLMHead(cfg.vocab_size, dec.embed_dim)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = dec.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        dec = self.model.decoder
        x = dec.embed_tokens(input_ids)
        if dec.project_in is not None:
            x = dec.project_in(x)
        x = x + dec.embed_positions(positions + self.config.position_offset)
        for layer in dec.layers:
            x = layer(x, ctx)
        if dec.final_layer_norm is not None:
            x = dec.final_layer_norm(x)
        if dec.project_out is not None:
            x = dec.project_out(x)  # back to the embedding width the tied LM head expects
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def checkpoint_name(self, name: str) -> str | tuple[str, int] | None:
        """Map a checkpoint tensor name to this module's parameter name (None: skip it), or to
        (merged parameter, part) for q/k/v."""
        if name == "lm_head.weight":
            return None if self.config.tie_word_embeddings else name
        # OPTModel checkpoints (e.g. some facebook/opt-* files) name tensors `decoder.…`.
        name = "model." + name if name.startswith("decoder.") else name
        module, _, param = name.rpartition(".")
        for part, proj in enumerate(("q_proj", "k_proj", "v_proj")):
            if module.endswith(".self_attn." + proj):
                return f"{module.removesuffix(proj)}qkv_proj.{param}", part
        return name


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
        eos_token_ids=_eos_ids(hf),
        do_layer_norm_before=bool(hf.get("do_layer_norm_before", True)),
        word_embed_proj_dim=hf.get("word_embed_proj_dim") or hidden,
        position_offset=2,
        extra={
            "layer_norm_elementwise_affine": bool(hf.get("layer_norm_elementwise_affine", True)),
            "remove_final_layer_norm": bool(hf.get("_remove_final_layer_norm", False)),
        },
    )
