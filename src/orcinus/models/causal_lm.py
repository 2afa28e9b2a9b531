"""What the model runner needs from a model (`CausalLM`), and the decoder-only skeleton every
family here builds on (`DecoderLM`).

Selective batching: every op works on the flat [num_tokens, hidden] tensor of the iteration; only
`PagedAttention` looks at which token belongs to which request.

Parameters live in one layout whatever the family (Llama's checkpoint names):
`model.embed_tokens` (first stage), `model.layers.N` (this stage's layers, N counted from 0 on
each stage), `model.norm` and `lm_head` (last stage); families add modules of their own (learned
positions, projections). A family maps its checkpoint names onto this layout in `rename` and
`layer_targets`.
"""
from __future__ import annotations

from typing import Callable, Iterable, Protocol

import torch
from torch import nn

from orcinus.config import ModelConfig
from orcinus.distributed.parallel_state import pipeline_stage
from orcinus.layers import fused_decode
from orcinus.layers.context import ForwardContext
from orcinus.layers.linear import CheckpointTensor, ParallelLMHead, VocabParallelEmbedding
from orcinus.layers.pipeline import on_first_stage, on_last_stage, stage_layers
from orcinus.models.weights import Target, load_checkpoint


_MISSING = object()


class CausalLM(Protocol):
    config: ModelConfig

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext,
                hidden: torch.Tensor | None = None) -> torch.Tensor:
        """This pipeline stage's hidden states for the flat batch: from token ids on the first
        stage, from the previous stage's `hidden` on the others (final-normed on the last)."""

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Last stage only: the full vocabulary's logits of the given rows."""

    @property
    def num_local_layers(self) -> int:
        """Layers this pipeline stage holds (the KV pool has one entry per layer)."""

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor | CheckpointTensor]]) -> None:
        """Fill the parameters from named checkpoint tensors (this stage's and rank's share)."""


class DecoderLM(nn.Module):
    """Embedding (first stage), this stage's decoder layers, final norm and LM head (last stage).

    A family passes `make_layer(layer, kv_index)` and sets `self.model.norm` (None where it has
    none); it overrides `embed`/`finish` when its ends differ (learned positions, projections)."""

    # checkpoint module (inside a layer) -> (merged module, part): q/k/v, gate/up
    MERGED_PARTS: dict[str, tuple[str, int]] = {
        "self_attn.q_proj": ("self_attn.qkv_proj", 0),
        "self_attn.k_proj": ("self_attn.qkv_proj", 1),
        "self_attn.v_proj": ("self_attn.qkv_proj", 2),
        "mlp.gate_proj": ("mlp.gate_up_proj", 0),
        "mlp.up_proj": ("mlp.gate_up_proj", 1),
    }

    def __init__(self, cfg: ModelConfig, make_layer: Callable[[int, int], nn.Module],
                 embed_dim: int | None = None) -> None:
        super().__init__()
        self.config = cfg
        embed_dim = embed_dim or cfg.hidden_size  # OPT's word embeddings may be narrower
        self.model = nn.Module()
        self.model.embed_tokens = on_first_stage(lambda: VocabParallelEmbedding(cfg.vocab_size, embed_dim))
        self.first_layer, self.model.layers = stage_layers(cfg.num_layers, make_layer)
        self.model.norm = None
        self.lm_head = on_last_stage(lambda: ParallelLMHead(cfg.vocab_size, embed_dim))
        stage = pipeline_stage()
        if cfg.tie_word_embeddings and stage.is_first and stage.is_last:
            self.lm_head.weight = self.model.embed_tokens.weight

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext,
                hidden: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed(input_ids, positions) if hidden is None else hidden
        fused = fused_decode.decode(self, self.model.layers, x, positions, ctx)
        if fused is not None:  # a CPU batch in one C call (layers/fused_decode.py)
            x = fused
        else:
            for layer in self.model.layers:
                x = layer(x, positions, ctx)
        return self.finish(x) if self.lm_head is not None else x

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's hidden states after its layers."""
        return self.model.norm(x) if self.model.norm is not None else x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    @property
    def num_local_layers(self) -> int:
        return len(self.model.layers)

    # ------------------------------------------------------------------ weights
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor | CheckpointTensor]]) -> None:
        load_checkpoint(self, self.checkpoint_targets, weights)

    def rename(self, name: str) -> str | None:
        """A checkpoint name in this layout (None: not a weight, skip it). Llama's are already."""
        return None if "rotary_emb" in name else name

    def layer_targets(self, prefix: str, module: str, param: str) -> list[Target]:
        """Targets of one layer's checkpoint tensor `<module>.<param>`; prefix: `model.layers.<i>`."""
        if module in self.MERGED_PARTS:
            merged, part = self.MERGED_PARTS[module]
            return [Target(f"{prefix}.{merged}.{param}", part)]
        return [Target(f"{prefix}.{module}.{param}")]

    def checkpoint_targets(self, name: str) -> list[Target]:
        """Where one checkpoint tensor goes on this stage and rank (nothing: another stage's)."""
        name = self.rename(name)
        if name is None:
            return []
        tied = self.config.tie_word_embeddings
        if name == "lm_head.weight" and tied:
            return []
        if name.startswith("model.layers."):
            _, _, index, rest = name.split(".", 3)
            i = int(index) - self.first_layer
            if not 0 <= i < len(self.model.layers):
                return []  # another stage's layer
            module, _, param = rest.rpartition(".")
            return self.layer_targets(f"model.layers.{i}", module, param)
        if name == "model.embed_tokens.weight" and self.model.embed_tokens is None:
            # A last stage without the embedding reads the tied LM head from it.
            return [Target("lm_head.weight")] if self.lm_head is not None and tied else []
        owner: object = self
        for attr in name.split(".")[:-1]:
            owner = getattr(owner, attr, _MISSING)
            if owner is None:
                return []  # a module this stage does not hold, or this model lacks (OPT's optional norm)
            if owner is _MISSING:
                break  # not ours at all: the loader says so
        return [Target(name)]
