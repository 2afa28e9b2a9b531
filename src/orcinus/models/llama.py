"""The Llama family: Llama 2/3, Mistral, SmolLM2, Qwen2 (q/k/v bias) and Qwen3 (q/k RMSNorm).

Selective batching in one screen: every op below works on the flat [num_tokens, hidden] tensor;
only `PagedAttention` consults the per-request metadata. Parameter names follow the Hugging Face
checkpoints so that weights load by name.

q/k/v and gate/up are each one merged GEMM (the loader concatenates the checkpoint's tensors).

Tensor parallelism (Megatron): q/k/v and gate/up are column-parallel (each rank holds some heads,
some of the MLP's hidden units), o_proj and down_proj row-parallel (one all-reduce each), the
embedding and LM head split the vocabulary. With fewer KV heads than ranks each KV head is
replicated on the ranks whose query heads use it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from orcinus.config import ModelConfig
from orcinus.distributed.parallel_state import even_split, kv_head_range, pipeline_stage
from orcinus.layers.attention import PagedAttention
from orcinus.layers.context import ForwardContext
from orcinus.layers.linear import (MergedColumnParallelLinear, ParallelLMHead, RowParallelLinear,
                                   VocabParallelEmbedding)
from orcinus.layers.norms import RMSNorm
from orcinus.layers.rotary import RotaryEmbedding
from orcinus.layers.row_chunks import in_row_chunks


# Checkpoint module -> (merged module, part index): the loader concatenates at load time.
MERGED_PARTS = {
    "self_attn.q_proj": ("self_attn.qkv_proj", 0),
    "self_attn.k_proj": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
}


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, rotary: RotaryEmbedding) -> None:
        super().__init__()
        d = cfg.head_dim
        self.head_dim = d
        heads = even_split(cfg.num_heads, "the number of attention heads")
        kv_start, kv_heads = kv_head_range(cfg.num_kv_heads)
        kv_range = (kv_start * d, kv_heads * d)
        # q, k and v in one GEMM; the checkpoint's q_proj/k_proj/v_proj load into its parts.
        kv_part = (cfg.num_kv_heads * d, kv_range)
        self.qkv_proj = MergedColumnParallelLinear(cfg.hidden_size, [(cfg.num_heads * d, None), kv_part, kv_part],
                                                   cfg.attention_bias)
        self.o_proj = RowParallelLinear(cfg.num_heads * d, cfg.hidden_size, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm
        self.rotary = [rotary]  # shared, kept out of the module tree
        # Qwen2/3 slide only in some layers (registry's `full_attention_layers`); Mistral in all.
        window = None if layer_idx in cfg.extra.get("full_attention_layers", ()) else cfg.sliding_window
        self.attn = PagedAttention(layer_idx, heads, kv_heads, d, d ** -0.5, window)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv_proj.split(self.qkv_proj(x))
        if self.qk_norm:
            q = self.q_norm(q.view(t, -1, self.head_dim)).view(t, -1)
            k = self.k_norm(k.view(t, -1, self.head_dim)).view(t, -1)
        q, k = self.rotary[0](positions, q, k, self.head_dim)
        return self.o_proj(self.attn(q, k, v, ctx))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        even_split(cfg.intermediate_size, "the MLP's intermediate_size")
        # gate and up in one GEMM (checkpoint parts 0 and 1)
        self.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size, [(cfg.intermediate_size, None)] * 2,
                                                       bias=False)
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return in_row_chunks(self._rows, x)

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj.split(self.gate_up_proj(x))
        return self.down_proj(F.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg, layer_idx, rotary)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), positions, ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaBackbone(nn.Module):
    """This pipeline stage's part: the embedding on the first stage, its run of layers, the
    final norm on the last stage. Layer i of the stage is layer first_layer + i of the model."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        stage = pipeline_stage()
        self.first_layer, end = stage.layer_range(cfg.num_layers)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size) if stage.is_first else None
        # Stage-local layer indices: each stage's KV pool holds only its own layers.
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, i, self.rotary) for i in range(end - self.first_layer))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps) if stage.is_last else None


class LlamaForCausalLM(nn.Module):
    supports_tensor_parallel = True
    supports_pipeline_parallel = True

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = LlamaBackbone(cfg)
        stage = pipeline_stage()
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size) if stage.is_last else None
        if cfg.tie_word_embeddings and stage.is_first and stage.is_last:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext,
                hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids on the first stage, the previous stage's hidden states on the others."""
        x = self.model.embed_tokens(input_ids) if self.model.embed_tokens is not None else hidden
        for layer in self.model.layers:
            x = layer(x, positions, ctx)
        return self.model.norm(x) if self.model.norm is not None else x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    @property
    def num_local_layers(self) -> int:
        return len(self.model.layers)

    def checkpoint_name(self, name: str) -> str | tuple[str, int] | None:
        """Map a checkpoint tensor name to this module's parameter name (None: skip it), or to
        (merged parameter, part) for q/k/v and gate/up."""
        if "rotary_emb" in name:
            return None
        has_embed, has_head = self.model.embed_tokens is not None, self.lm_head is not None
        if name == "lm_head.weight" and self.config.tie_word_embeddings:
            return None
        if name == "model.embed_tokens.weight":
            if has_embed:
                return name
            # A last stage without the embedding reads the tied LM head from it.
            return "lm_head.weight" if has_head and self.config.tie_word_embeddings else None
        if name.startswith("lm_head."):
            return name if has_head else None
        if name.startswith("model.norm."):
            return name if self.model.norm is not None else None
        if name.startswith("model.layers."):
            i = int(name.split(".")[2]) - self.model.first_layer
            if not 0 <= i < len(self.model.layers):
                return None  # another stage's layer
            module, _, param = name.split(".", 3)[3].rpartition(".")
            if module in MERGED_PARTS:
                merged, part = MERGED_PARTS[module]
                return f"model.layers.{i}.{merged}.{param}", part
            return f"model.layers.{i}.{module}.{param}"
        return name
