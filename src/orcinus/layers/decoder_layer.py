"""One decoder layer: attention and MLP, each with a residual connection and a norm.

Pre-norm (Llama, GPT-2, most OPT sizes) normalises each sublayer's input; post-norm (opt-350m)
normalises after each residual add. The norms' names follow Llama's checkpoints whichever way
they are applied: `input_layernorm` belongs to the attention, `post_attention_layernorm` to the MLP.
"""
from __future__ import annotations

import torch
from torch import nn

from orcinus.layers.context import ForwardContext


class DecoderLayer(nn.Module):
    def __init__(self, self_attn: nn.Module, mlp: nn.Module, input_layernorm: nn.Module,
                 post_attention_layernorm: nn.Module, pre_norm: bool = True) -> None:
        super().__init__()
        self.input_layernorm = input_layernorm
        self.self_attn = self_attn
        self.post_attention_layernorm = post_attention_layernorm
        self.mlp = mlp
        self.pre_norm = pre_norm

    def forward(self, x: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.self_attn(self.input_layernorm(x), positions, ctx)
            return x + self.mlp(self.post_attention_layernorm(x))
        x = self.input_layernorm(x + self.self_attn(x, positions, ctx))
        return self.post_attention_layernorm(x + self.mlp(x))
