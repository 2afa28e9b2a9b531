"""Activation functions by the names Hugging Face configs use (`activation_function`, `hidden_act`).

All of them act element-wise, so they run on the flat [num_tokens, dim] tensor as one batch."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

Activation = Callable[[torch.Tensor], torch.Tensor]


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    # GPT-2's "gelu_new" is the tanh approximation of GELU; torch has it built in.
    return F.gelu(x, approximate="tanh")


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


_ACTIVATIONS: dict[str, Activation] = {
    "gelu": F.gelu,
    "gelu_new": _gelu_tanh,
    "gelu_fast": _gelu_tanh,  # same curve, written differently
    "gelu_pytorch_tanh": _gelu_tanh,
    "quick_gelu": _quick_gelu,
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


def get_activation(name: str) -> Activation:
    if name not in _ACTIVATIONS:
        raise ValueError(f"activation {name!r} is not supported; orcinus knows: {', '.join(sorted(_ACTIVATIONS))}")
    return _ACTIVATIONS[name]
