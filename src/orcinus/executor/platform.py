"""Where a worker runs and in which dtype: the settings' `device="auto"` and `dtype="auto"` turned
into a torch device and dtype.

This is hardware resolution, so it lives on the executor side, next to the worker that loads the
model, not in `EngineConfig` (plain settings): on CPU, `dtype="auto"` reads the stored
`orcinus bench bf16` verdict for the resolved model path (see orcinus/cpu_features.py). The
engine learns the outcome from its executor (the workers report it when they are ready).
"""
from __future__ import annotations

import torch

from orcinus.config import DTYPES, EngineConfig
from orcinus.cpu_features import auto_cpu_dtype
from orcinus.errors import ConfigError


def resolve_device(config: EngineConfig) -> torch.device:
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(config.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={config.device!r} was asked for but CUDA is not available; use device='cpu'")
    return dev


def resolve_dtype(config: EngineConfig, device: torch.device, model_path: str | None) -> torch.dtype:
    """`model_path` is the resolved checkpoint (the bf16 verdict is stored per model and CPU)."""
    if config.dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16
        return auto_cpu_dtype(model_path).dtype
    return DTYPES[config.dtype]


def dtype_note(config: EngineConfig, device: torch.device, model_path: str | None) -> str:
    """Why `dtype=auto` chose what it did on CPU (bf16 only with native units that measure faster);
    empty where the user chose, or on CUDA."""
    if config.dtype != "auto" or device.type != "cpu":
        return ""
    return f" ({auto_cpu_dtype(model_path).reason}; threads={torch.get_num_threads()})"


def resolve_for_config(config: EngineConfig) -> tuple[torch.device, torch.dtype]:
    """Device and dtype for `config` without a worker (benchmarks, reports): the model path is
    resolved here; a model that does not exist reads no bf16 verdict (loading it fails later)."""
    from orcinus.errors import ModelNotFound
    from orcinus.models.loader import resolve_model_path

    device = resolve_device(config)
    try:
        path: str | None = resolve_model_path(config.model)
    except ModelNotFound:
        path = None
    return device, resolve_dtype(config, device, path)
