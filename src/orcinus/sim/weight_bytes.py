"""The bytes a forward reads for its weights, as the loaded model holds them.

A GGUF model kept quantized holds its linear weights in their blocks (Q4_1: 20 bytes per 32
weights, Q8_0: 34, ...), not as `dtype` elements; the cost model's memory term must count those
bytes, and the quantized path's own costs depend on how many weights are in blocks (the integer
kernel below `dequant_min_rows(dtype)` rows, the dequantisation into the activations' dtype from
there up: layers/quantized_linear.py). This is taken from the loaded model's parameters (what they
occupy, `numel x element_size`), never from a dtype assumption.

`bench calibrate` measures it on the model it loads and stores it beside the calibration
(`$ORCINUS_CACHE/sim/weights.json`, keyed by model file, quantization mode and dtype), where the
simulator finds it for the same model (`sim/bench_hooks.target_from`).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from dataclasses import dataclass

logger = logging.getLogger(__name__)

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass(frozen=True)
class WeightInfo:
    """Per decoder layer (the mean over layers) and for the LM head and the embedding."""

    layer_bytes: float  # every parameter of one layer, as held (blocks for quantized weights)
    lm_head_bytes: float
    embedding_bytes: float
    layer_quant_elements: float = 0.0  # logical weights of a layer held in quantized blocks
    lm_head_quant_elements: float = 0.0
    dequant_min_rows: int = 0  # rows from which a quantized linear dequantises then runs a GEMM

    @property
    def quantized(self) -> bool:
        return self.layer_quant_elements > 0 or self.lm_head_quant_elements > 0


def _param_bytes(p) -> int:
    return p.numel() * p.element_size()


def _quant_elements(p) -> int:
    from orcinus.layers.quantized_linear import quantized

    q = quantized(p)
    return q.in_features * q.out_features if q is not None else 0


def measure_weight_info(model, dtype=None) -> WeightInfo:
    """From a loaded orcinus model (an nn.Module with `model.layers.N.` parameters and an
    `lm_head`); a tied LM head counts the embedding's tensor, which it reads."""
    import torch

    from orcinus.layers.quantized_linear import dequant_min_rows

    per_layer: dict[int, list[int]] = {}
    embedding = 0
    # a layer's buffers are read with its parameters; the model-wide ones (rotary tables) are
    # gathered a few rows per token, not read whole, so they do not count
    tensors = list(model.named_parameters()) + [(n, b) for n, b in model.named_buffers() if _LAYER.search(n)]
    for name, p in tensors:
        m = _LAYER.search(name)
        if m:
            acc = per_layer.setdefault(int(m.group(1)), [0, 0])
            acc[0] += _param_bytes(p)
            acc[1] += _quant_elements(p)
        elif name.endswith("embed_tokens.weight"):
            embedding += _param_bytes(p)
    head = getattr(model, "lm_head", None)
    weight = getattr(head, "weight", None)
    n = max(len(per_layer), 1)
    dtype = dtype or next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return WeightInfo(
        layer_bytes=sum(b for b, _ in per_layer.values()) / n,
        lm_head_bytes=float(_param_bytes(weight)) if weight is not None else 0.0,
        embedding_bytes=float(embedding),
        layer_quant_elements=sum(q for _, q in per_layer.values()) / n,
        lm_head_quant_elements=float(_quant_elements(weight)) if weight is not None else 0.0,
        dequant_min_rows=dequant_min_rows(dtype))


# ------------------------------------------------------------------------------------ the store
def store_path() -> str:
    root = os.environ.get("ORCINUS_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "orcinus"))
    return os.path.join(root, "sim", "weights.json")


def model_key(model: str | None, quantization: str, dtype: str) -> str:
    """The model file (resolved, so the default model and its path agree), how its weights are kept,
    and the serving dtype."""
    from orcinus.models.loader import resolve_model_path

    try:
        path = os.path.realpath(resolve_model_path(model))
    except Exception:  # a shape preset: no file
        path = str(model)
    return f"{path}|{quantization}|{dtype}"


def _read(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def store_weight_info(key: str, info: WeightInfo, path: str | None = None) -> str:
    path = path or store_path()
    data = _read(path)
    data[key] = dataclasses.asdict(info)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
    return path


def lookup_weight_info(key: str, path: str | None = None) -> WeightInfo | None:
    entry = _read(path or store_path()).get(key)
    return WeightInfo(**entry) if entry else None
