"""Per-iteration time from the model's shapes and the batch's token counts (a roofline).

For each pipeline stage, on one of its tensor-parallel devices:
- GEMMs (q/k/v, output projection, MLP; the LM head on the last stage): 2 flops per parameter per
  token, every weight byte read once (the bytes the loaded model holds where `ModelShape.weights`
  gives them: quantized blocks); time = max(flops / (peak x eff_gemm), bytes / (bandwidth x
  eff_memory)). Quantized weights add their own kernels' time: the integer kernel's flops below
  the crossover (eff_qdot), the dequantisation's bytes from it up (eff_dequant).
- Attention, per request: QK^T and PV flops over its context (causal within the new tokens) and
  its whole KV read once plus the new KV written; time = max(flops / peak, bytes / bandwidth) /
  eff_attention.
- Element-wise work (norms, activations, residuals, rotary, the logits' softmax): bytes over
  bandwidth x eff_memory.
- Tensor parallelism: two all-reduces of the activations per layer (after attention and after the
  MLP), ring-sized bytes (2 (t-1)/t) over the node's link plus a latency per ring step; the logits'
  all-gather on the last stage. Pipeline parallelism: the activations sent to the next stage.
The engine's own per-iteration time (control plane) is `Hardware.overhead`, applied by the executor.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from orcinus.sim.hardware import Hardware, HardwareError
from orcinus.sim.shapes import DTYPE_BYTES, ModelShape

# Element-wise activation traffic per layer and token, in units of hidden_size (two norms read and
# written, two residual adds, rotary on q and k) and of the (per-device) intermediate size
# (activation and gating). An estimate; calibration absorbs its error into eff_memory.
ELEMENTWISE_HIDDEN = 10
ELEMENTWISE_INTERMEDIATE = 3


@dataclass(frozen=True)
class BatchShape:
    """What the cost of an iteration depends on, summed over its rows."""

    tokens: int = 0  # new tokens computed (prompt chunks + one per decode)
    rows: int = 0
    sampled: int = 0  # rows that sample a token (run the LM head)
    keys_seen: float = 0.0  # sum over new tokens of the keys each attends to (causal)
    kv_tokens: int = 0  # sum over rows of context + new tokens: KV entries touched

    @classmethod
    def of(cls, rows: list[tuple[int, int, bool]]) -> "BatchShape":
        """rows: (new tokens, tokens already computed, samples)."""
        t = s = kv = 0
        keys = 0.0
        for n, c, smp in rows:
            t += n
            s += smp
            keys += n * c + n * (n + 1) / 2
            kv += c + n
        return cls(t, len(rows), s, keys, kv)


@dataclass(frozen=True)
class Parallel:
    tp: int = 1
    pp: int = 1

    @property
    def devices(self) -> int:
        return self.tp * self.pp


@dataclass
class StageWork:
    """Flops, bytes and communication of one iteration on one device of one stage."""

    gemm_flops: float = 0.0
    gemm_bytes: float = 0.0
    attn_flops: float = 0.0
    attn_bytes: float = 0.0
    elem_bytes: float = 0.0
    qdot_flops: float = 0.0  # GEMM flops of quantized weights run by the integer kernel (few rows)
    dequant_bytes: float = 0.0  # quantized weights dequantised into the activations' dtype (many rows)
    comm_bytes: float = 0.0  # ring-sized bytes each device sends for the TP collectives
    comm_steps: int = 0  # latency-bound steps of those collectives
    send_bytes: float = 0.0  # to the next stage (0 on the last)


@dataclass(frozen=True)
class StageTime:
    gemm: float
    attention: float
    elementwise: float
    comm: float
    send: float

    @property
    def compute(self) -> float:
        return self.gemm + self.attention + self.elementwise + self.comm


class CostModel:
    def __init__(self, shape: ModelShape, hardware: Hardware, parallel: Parallel = Parallel(),
                 dtype: str = "float16", kv_dtype: str | None = None) -> None:
        if dtype not in DTYPE_BYTES:
            raise HardwareError(f"dtype {dtype!r} is unknown; choose one of {tuple(DTYPE_BYTES)}")
        if parallel.pp > shape.num_layers:
            raise HardwareError(f"{parallel.pp} pipeline stages for {shape.num_layers} layers")
        self.shape, self.hw, self.par, self.dtype = shape, hardware, parallel, dtype
        self.wb = DTYPE_BYTES[dtype]
        self.kvb = DTYPE_BYTES[kv_dtype or dtype]
        self.peak = hardware.flops_for(dtype)
        # Even split, earlier stages take the remainder (as orcinus's pipeline stages do).
        base, extra = divmod(shape.num_layers, parallel.pp)
        self.stage_layers = [base + (1 if s < extra else 0) for s in range(parallel.pp)]
        # Stages on one node talk over its links; a group wider than a node crosses nodes.
        self.tp_link = hardware.intra_node if parallel.tp <= hardware.devices_per_node else hardware.inter_node
        self.pp_link = hardware.intra_node if parallel.devices <= hardware.devices_per_node else hardware.inter_node

    # ------------------------------------------------------------------ flops and bytes
    def kv_heads_per_device(self) -> int:
        return math.ceil(self.shape.num_kv_heads / self.par.tp)  # replicated when fewer than ranks

    def stage_work(self, b: BatchShape, stage: int) -> StageWork:
        sh, tp, L = self.shape, self.par.tp, self.stage_layers[stage]
        last = stage == self.par.pp - 1
        w = StageWork()
        params = sh.layer_linear_params / tp
        wi = sh.weights
        w.gemm_flops = 2.0 * b.tokens * params * L
        w.gemm_bytes = (wi.layer_bytes / tp if wi else params * self.wb) * L
        if wi and wi.layer_quant_elements:
            self._quantized_path(w, b.tokens, wi.layer_quant_elements / tp * L, w.gemm_flops
                                 * min(wi.layer_quant_elements / sh.layer_linear_params, 1.0))
        heads = sh.num_heads / tp
        w.attn_flops = 4.0 * heads * sh.head_dim * b.keys_seen * L
        w.attn_bytes = 2.0 * self.kv_heads_per_device() * sh.head_dim * self.kvb * (b.kv_tokens + b.tokens) * L
        act = self.wb
        w.elem_bytes = b.tokens * act * L * (ELEMENTWISE_HIDDEN * sh.hidden_size
                                             + ELEMENTWISE_INTERMEDIATE * sh.intermediate_size / tp)
        if tp > 1:
            w.comm_bytes = 2 * L * 2.0 * (tp - 1) / tp * b.tokens * sh.hidden_size * act
            w.comm_steps = 2 * L * 2 * (tp - 1)
        if last:
            head = sh.vocab_size * sh.hidden_size / tp
            w.gemm_flops += 2.0 * b.sampled * head
            w.gemm_bytes += wi.lm_head_bytes / tp if wi else head * self.wb
            if wi and wi.lm_head_quant_elements and b.sampled:
                self._quantized_path(w, b.sampled, wi.lm_head_quant_elements / tp, 2.0 * b.sampled * head)
            w.elem_bytes += 3 * 4.0 * b.sampled * sh.vocab_size  # float32 logits: softmax, sampling
            if tp > 1 and b.sampled:
                w.comm_bytes += (tp - 1) / tp * b.sampled * sh.vocab_size * 4.0
                w.comm_steps += tp - 1
        else:
            w.send_bytes = b.tokens * sh.hidden_size * act
        return w

    def _quantized_path(self, w: StageWork, rows: int, elements: float, flops: float) -> None:
        """Weights kept in quantized blocks (layers/quantized_linear.py): below the crossover the
        integer kernel does their flops (its own efficiency, `qdot`); from it up they are
        dequantised into the activations' dtype (`dequant`, bytes written) and a float GEMM runs."""
        if rows >= self.shape.weights.dequant_min_rows:
            w.dequant_bytes += elements * self.wb
        else:
            w.gemm_flops -= flops
            w.qdot_flops += flops

    # ------------------------------------------------------------------ time
    def stage_time(self, b: BatchShape, stage: int) -> StageTime:
        w, hw = self.stage_work(b, stage), self.hw
        bw = hw.memory_bandwidth
        gemm = max(w.gemm_flops / (self.peak * hw.eff("gemm")), w.gemm_bytes / (bw * hw.eff("memory")))
        if w.qdot_flops or w.dequant_bytes:  # quantized weights: their own kernels, added to the roofline's
            gemm += w.qdot_flops / (self.peak * hw.eff("qdot")) + w.dequant_bytes / (bw * hw.eff("dequant"))
        attn = max(w.attn_flops / self.peak, w.attn_bytes / bw) / hw.eff("attention")
        elem = w.elem_bytes / (bw * hw.eff("memory"))
        link = self.tp_link
        comm = w.comm_bytes / (link.bandwidth * hw.eff("comm")) + w.comm_steps * link.latency_s if w.comm_bytes else 0.0
        send = (w.send_bytes / (self.pp_link.bandwidth * hw.eff("comm")) + self.pp_link.latency_s
                if w.send_bytes else 0.0)
        return StageTime(gemm, attn, elem, comm, send)

    def stage_seconds(self, b: BatchShape) -> list[tuple[float, float]]:
        """(compute, send to the next stage) per stage."""
        return [(t.compute, t.send) for t in (self.stage_time(b, s) for s in range(self.par.pp))]

    def iteration_seconds(self, b: BatchShape) -> float:
        """One iteration alone, through every stage (no overlap with other batches)."""
        return sum(c + s for c, s in self.stage_seconds(b))

    # ------------------------------------------------------------------ memory
    def weight_bytes_per_device(self, stage: int) -> float:
        sh, wi = self.shape, self.shape.weights
        if wi is not None:  # as the loaded model holds them
            per = wi.layer_bytes * self.stage_layers[stage]
            if stage == 0:
                per += wi.embedding_bytes
            if stage == self.par.pp - 1 and not (sh.tie_word_embeddings and self.par.pp == 1):
                per += wi.lm_head_bytes
            return per / self.par.tp
        per = sh.layer_linear_params * self.stage_layers[stage] / self.par.tp
        if stage == 0:
            per += sh.vocab_size * sh.hidden_size / self.par.tp
        if stage == self.par.pp - 1 and not (sh.tie_word_embeddings and self.par.pp == 1):
            per += sh.vocab_size * sh.hidden_size / self.par.tp
        return per * self.wb

    def kv_bytes_per_token(self, stage: int) -> float:
        return 2.0 * self.stage_layers[stage] * self.kv_heads_per_device() * self.shape.head_dim * self.kvb

    def kv_capacity_tokens(self, memory_bytes: float | None = None) -> int:
        """Tokens of KV every stage can hold: device memory x utilisation less its weights
        (`memory_bytes` given: that much for the KV pool on each device, as `kv_cache_memory`)."""
        out = []
        for s in range(self.par.pp):
            free = (memory_bytes if memory_bytes is not None
                    else self.hw.memory_bytes * self.hw.memory_utilization - self.weight_bytes_per_device(s))
            if free <= 0:
                raise HardwareError(
                    f"{self.shape.name} does not fit on {self.par.devices} x {self.hw.name}: stage {s} needs "
                    f"{self.weight_bytes_per_device(s) / 1e9:.1f} GB of weights per device of "
                    f"{self.hw.memory_bytes / 1e9:.0f} GB; use more tensor or pipeline parallelism")
            out.append(int(free // self.kv_bytes_per_token(s)))
        return min(out)
