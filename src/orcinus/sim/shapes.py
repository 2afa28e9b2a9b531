"""Model shapes for the cost model: numbers only, from a checkpoint's config or a preset.

A simulated run needs no weights: the engine learns the model's shape (`ModelConfig`) from here and
the cost model counts flops and bytes from the same numbers."""
from __future__ import annotations

from dataclasses import dataclass

from orcinus.config import ModelConfig
from orcinus.sim.weight_bytes import WeightInfo

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ModelShape:
    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    mlp_matrices: int = 3  # gated MLP (Llama); 2 for GPT-style MLPs
    tie_word_embeddings: bool = False
    eos_token_id: int = 0
    # the weights as a loaded model holds them (quantized blocks); None: every weight in the serving dtype
    weights: WeightInfo | None = None

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def layer_linear_params(self) -> int:
        h = self.hidden_size
        return h * self.q_size + 2 * h * self.kv_size + self.q_size * h + self.mlp_matrices * h * self.intermediate_size

    @property
    def num_params(self) -> int:
        embed = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * self.layer_linear_params + embed

    def model_config(self) -> ModelConfig:
        """What the engine needs to know (vocabulary, context, EOS); no weights behind it."""
        return ModelConfig(architecture="llama" if self.mlp_matrices == 3 else "gpt2", vocab_size=self.vocab_size,
                           hidden_size=self.hidden_size, num_layers=self.num_layers, num_heads=self.num_heads,
                           num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
                           intermediate_size=self.intermediate_size,
                           max_position_embeddings=self.max_position_embeddings,
                           tie_word_embeddings=self.tie_word_embeddings, eos_token_ids=[self.eos_token_id])

    @classmethod
    def from_model_config(cls, cfg: ModelConfig, name: str = "", weights: WeightInfo | None = None) -> "ModelShape":
        mlp = 2 if cfg.architecture in ("gpt2", "opt") else 3
        eos = cfg.eos_token_ids[0] if cfg.eos_token_ids else 0
        return cls(name or cfg.architecture, cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads,
                   cfg.head_dim, cfg.intermediate_size, cfg.vocab_size, cfg.max_position_embeddings, mlp,
                   cfg.tie_word_embeddings, eos, weights)


def _gpt3(name: str, layers: int, hidden: int) -> ModelShape:
    # GPT-3 (Brown et al. 2020): head size 128, MLP 4h with two matrices, BPE vocabulary of 50257,
    # context 2048; the Orca paper's Table 1 gives layers and hidden size of each size.
    return ModelShape(name, layers, hidden, hidden // 128, hidden // 128, 128, 4 * hidden, 50257, 2048,
                      mlp_matrices=2, tie_word_embeddings=True, eos_token_id=50256)


PRESETS: dict[str, ModelShape] = {
    "gpt3-13b": _gpt3("gpt3-13b", 40, 5120),
    "gpt3-101b": _gpt3("gpt3-101b", 80, 10240),
    "gpt3-175b": _gpt3("gpt3-175b", 96, 12288),
    "gpt3-341b": _gpt3("gpt3-341b", 120, 15360),
    # Llama 3 (Meta, config.json of Meta-Llama-3-70B / -8B)
    "llama-3-70b": ModelShape("llama-3-70b", 80, 8192, 64, 8, 128, 28672, 128256, 8192, eos_token_id=128001),
    "llama-3-8b": ModelShape("llama-3-8b", 32, 4096, 32, 8, 128, 14336, 128256, 8192, eos_token_id=128001),
}


def load_shape(model: str | None) -> ModelShape:
    """A preset name, or a checkpoint folder / GGUF file whose config is read (no weights)."""
    if model in PRESETS:
        return PRESETS[model]
    from orcinus.bench.trace_builder import read_model_config

    return ModelShape.from_model_config(read_model_config(model), name=model or "default")
