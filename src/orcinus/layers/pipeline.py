"""Pipeline-stage helpers for building a model: which layers this stage holds, and modules that
exist only on the first stage (embeddings) or only on the last (final norm, LM head).

A stage holds a contiguous run of layers (`PipelineStage.layer_range`). Each layer is built with
its model-wide index (per-layer settings: sliding-window layers, GPT-2's per-layer scaling) and
its index in this stage's KV pool, which holds only this stage's layers.
"""
from __future__ import annotations

from typing import Callable, TypeVar

from torch import nn

from orcinus.distributed.parallel_state import pipeline_stage

M = TypeVar("M", bound=nn.Module)


def stage_layers(num_layers: int, make_layer: Callable[[int, int], nn.Module]) -> tuple[int, nn.ModuleList]:
    """(first model-wide layer index, this stage's layers); make_layer(layer, kv_index)."""
    first, end = pipeline_stage().layer_range(num_layers)
    return first, nn.ModuleList(make_layer(first + i, i) for i in range(end - first))


def on_first_stage(make: Callable[[], M]) -> M | None:
    return make() if pipeline_stage().is_first else None


def on_last_stage(make: Callable[[], M]) -> M | None:
    return make() if pipeline_stage().is_last else None
