"""GPT-2: learned absolute positions, LayerNorm, a fused q/k/v projection and a tied LM head.

As in every orcinus model, all ops run on the flat [num_tokens, hidden] tensor of the iteration;
only `PagedAttention` looks at which token belongs to which request. Parameter names follow the
Hugging Face checkpoints (`transformer.h.N.attn.c_attn.weight`, ...) so weights load by name.
"""
from __future__ import annotations

import torch
from torch import nn

from orcinus.config import ModelConfig
from orcinus.distributed.parallel_state import all_reduce, even_split, tensor_parallel
from orcinus.layers.activations import get_activation
from orcinus.layers.attention import PagedAttention
from orcinus.layers.context import ForwardContext
from orcinus.layers.linear import CheckpointTensor, ParallelLMHead, VocabParallelEmbedding
from orcinus.layers.row_chunks import in_row_chunks
from orcinus.models.registry import UnsupportedModel, _eos_ids


class Conv1D(nn.Module):
    """GPT-2's linear layer. Its weight is stored [in, out] (the transpose of nn.Linear), and we keep
    that layout so checkpoint tensors load untouched: y = x @ W + b.

    Tensor parallel: `split="out"` keeps this rank's output columns (in `groups` equal blocks of the
    full output, e.g. q, k, v side by side: each keeps its own slice of every block); `split="in"`
    keeps its input rows, sums the partial outputs with one all-reduce and adds the bias once."""

    def __init__(self, in_features: int, out_features: int, split: str = "out", groups: int = 1) -> None:
        super().__init__()
        tp = tensor_parallel()
        self.split = split
        if split == "out":
            block = out_features // groups
            per = even_split(block, "an output dimension")
            starts = [g * block + tp.rank * per for g in range(groups)]
            self.weight = _conv_param((in_features, per * groups), 1, starts, per, (in_features, out_features))
            self.bias = _conv_param((per * groups,), 0, starts, per, (out_features,))
        else:
            per = even_split(in_features, "an input dimension")
            self.weight = _conv_param((per, out_features), 0, [tp.rank * per], per, (in_features, out_features))
            self.bias = _conv_param((out_features,), 0, [0], out_features, (out_features,))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.split == "out":
            return torch.addmm(self.bias, x, self.weight)
        return all_reduce(x @ self.weight) + self.bias


def _conv_param(shape: tuple[int, ...], dim: int, starts: list[int], length: int,
                full_shape: tuple[int, ...]) -> nn.Parameter:
    def load(param: nn.Parameter, loaded: CheckpointTensor) -> None:
        if tuple(loaded.shape) != tuple(full_shape):
            raise ValueError(f"checkpoint tensor has shape {tuple(loaded.shape)}, expected {tuple(full_shape)}")
        if len(starts) == 1 and length == full_shape[dim]:
            part = loaded.full()
        else:
            part = torch.cat([loaded.narrow(dim, s, length) for s in starts], dim=dim)
        param.data = part.to(device=param.device, dtype=param.dtype).contiguous()

    p = nn.Parameter(torch.empty(shape), requires_grad=False)
    p.weight_loader = load
    return p


class GPT2Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        heads = even_split(cfg.num_heads, "the number of attention heads")  # on this tensor-parallel rank
        self.hidden_size = heads * cfg.head_dim  # of this rank's q (and k, v)
        self.c_attn = Conv1D(cfg.hidden_size, 3 * cfg.hidden_size, groups=3)  # q, k, v side by side
        self.c_proj = Conv1D(cfg.hidden_size, cfg.hidden_size, split="in")
        scale = cfg.head_dim ** -0.5 if cfg.extra.get("scale_attn_weights", True) else 1.0
        if cfg.extra.get("scale_attn_by_inverse_layer_idx", False):
            scale /= layer_idx + 1  # a per-layer constant, so it folds into the softmax scale
        self.attn = PagedAttention(layer_idx, heads, heads, cfg.head_dim, scale)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        q, k, v = self.c_attn(x).split(self.hidden_size, dim=-1)
        # q is a strided view into the fused output; pack it so a fused backend may assume dense
        # rows (k and v are copied into the KV cache anyway).
        return self.c_proj(self.attn(q.contiguous(), k, v, ctx))


class GPT2MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        even_split(cfg.intermediate_size, "the MLP's n_inner")
        self.c_fc = Conv1D(cfg.hidden_size, cfg.intermediate_size)
        self.c_proj = Conv1D(cfg.intermediate_size, cfg.hidden_size, split="in")
        self.act = get_activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return in_row_chunks(lambda rows: self.c_proj(self.act(self.c_fc(rows))), x)


class GPT2Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = GPT2Attention(cfg, layer_idx)
        self.ln_2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = GPT2MLP(cfg)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), ctx)
        return x + self.mlp(self.ln_2(x))


class GPT2Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.wte = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.wpe = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.h = nn.ModuleList(GPT2Block(cfg, i) for i in range(cfg.num_layers))
        self.ln_f = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class GPT2LMHeadModel(nn.Module):
    supports_tensor_parallel = True

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.transformer = GPT2Backbone(cfg)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        # Positions are per request (the runner restarts them at each request's context length),
        # so one gather gives every token of the mixed batch its own learned position embedding.
        x = self.transformer.wte(input_ids) + self.transformer.wpe(positions)
        for block in self.transformer.h:
            x = block(x, ctx)
        return self.transformer.ln_f(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def checkpoint_name(self, name: str) -> str | None:
        """Map a checkpoint tensor name to this module's parameter name (None: skip it)."""
        parts = name.split(".")
        # attn.bias / attn.masked_bias are the causal-mask buffers older checkpoints saved.
        if len(parts) >= 2 and parts[-2] == "attn" and parts[-1] in ("bias", "masked_bias"):
            return None
        if name == "lm_head.weight":
            return None if self.config.tie_word_embeddings else name
        # GPT2Model (rather than GPT2LMHeadModel) checkpoints name tensors without the prefix.
        return name if name.startswith("transformer.") else "transformer." + name


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
        eos_token_ids=_eos_ids(hf),
        extra={
            "scale_attn_weights": bool(hf.get("scale_attn_weights", True)),
            "scale_attn_by_inverse_layer_idx": bool(hf.get("scale_attn_by_inverse_layer_idx", False)),
        },
    )
