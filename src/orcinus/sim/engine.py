"""Builds an `LLMEngine` on a simulated executor: the model's shape from a preset or a config
file (no weights, no tokenizer), the KV pool sized from the hardware, a fresh virtual clock."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from orcinus.config import DEFAULT_BATCHED_TOKENS_CPU, DEFAULT_BATCHED_TOKENS_CUDA, EngineConfig
from orcinus.sim.clock import VirtualClock
from orcinus.sim.cost_model import CostModel, Parallel
from orcinus.sim.executor import LengthOracle, SimulatedExecutor
from orcinus.sim.hardware import Hardware
from orcinus.sim.shapes import ModelShape


@dataclass(frozen=True)
class SimTarget:
    """What is simulated: a model's shape on a number of devices of one kind."""

    shape: ModelShape
    hardware: Hardware
    parallel: Parallel = Parallel()
    dtype: str = "float16"

    def describe(self) -> str:
        return (f"{self.shape.name} on {self.parallel.devices} x {self.hardware.name} "
                f"(TP {self.parallel.tp} x PP {self.parallel.pp}, {self.dtype})")


def sim_config(config: EngineConfig, target: SimTarget) -> EngineConfig:
    """`config` as the simulated engine runs it: the target's parallelism (for batches in flight),
    no tokenizer, no generation-config files, the device type's token budget when none is given."""
    budget = config.max_num_batched_tokens or (DEFAULT_BATCHED_TOKENS_CPU if target.hardware.kind == "cpu"
                                               else DEFAULT_BATCHED_TOKENS_CUDA)
    return dataclasses.replace(config, device="cpu", dtype=target.dtype, skip_tokenizer_init=True,
                               generation_config="vllm", max_num_batched_tokens=budget,
                               tensor_parallel_size=target.parallel.tp,
                               pipeline_parallel_size=target.parallel.pp, nnodes=1)


def sim_kv_dtype(config: EngineConfig, target: SimTarget) -> str:
    """The KV pool's dtype the real engine would choose (executor/model_runner.resolve_kv_dtype):
    the one given, else float16 for float32 activations over weights kept in GGUF blocks on a
    CPU, else the serving dtype."""
    if config.kv_cache_dtype != "auto":
        return config.kv_cache_dtype
    weights = target.shape.weights
    if target.hardware.kind == "cpu" and target.dtype == "float32" and weights is not None and weights.quantized:
        return "float16"
    return target.dtype


def kv_blocks(cost: CostModel, config: EngineConfig) -> int:
    if config.kv_cache_memory is not None:
        tokens = cost.kv_capacity_tokens(config.kv_cache_memory)
    elif cost.hw.kind == "cpu":
        tokens = cost.kv_capacity_tokens(cost.hw.memory_bytes)
    else:
        tokens = cost.kv_capacity_tokens()
    return max(1, tokens // config.block_size)


def build_sim_engine(config: EngineConfig, target: SimTarget, lengths: LengthOracle | None = None,
                     clock: VirtualClock | None = None, record_iterations: bool = False):
    """(engine, executor); the executor's `clock` is the run's time."""
    from orcinus.engine.llm_engine import LLMEngine

    cfg = sim_config(config, target)
    cost = CostModel(target.shape, target.hardware, target.parallel, target.dtype, kv_dtype=sim_kv_dtype(config, target))
    executor = SimulatedExecutor(target.shape.model_config(), kv_blocks(cost, cfg), cost, clock or VirtualClock(),
                                 lengths, model_path=target.shape.name, record_iterations=record_iterations,
                                 dtype=target.dtype)
    return LLMEngine(cfg, executor=executor), executor
