"""The physical floor of an offline trace: a time no system can beat on this device.

Every iteration must read all weights once (the LM head included) and every running request's
KV cache once, write the KV of its new tokens, and do the matmul and attention flops of its
tokens. Given measured copy bandwidth and matmul rate, an iteration cannot take less than
max(bytes / bandwidth, flops / flop rate); the floor is the sum over the iterations of an ideal
iteration-level schedule of the trace (all requests at once, at most max_num_seqs running, no
overhead between iterations). Achieved throughput divided by the floor's is the headroom left.

Counts follow the Llama family (gated MLP: three matrices; grouped-query attention); GPT-2 and
OPT have two MLP matrices, which `ModelDims.from_model_config` takes into account. Biases, norms'
flops and the embedding lookup are left out: they are tiny, and leaving them out keeps it a floor.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch


@dataclass(frozen=True)
class ModelDims:
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    weight_bytes_per_param: float  # 4 for float32, 2 for bf16/fp16
    kv_bytes_per_elem: float
    mlp_matrices: int = 3  # gated MLP (Llama, Qwen, Mistral); 2 for GPT-2 and OPT

    @classmethod
    def from_model_config(cls, cfg, dtype: torch.dtype) -> "ModelDims":
        elem = torch.tensor([], dtype=dtype).element_size()
        mlp = 2 if cfg.architecture in ("gpt2", "opt") else 3
        return cls(cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                   cfg.intermediate_size, cfg.vocab_size, elem, elem, mlp)

    @property
    def layer_linear_params(self) -> int:
        h, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return h * q + 2 * h * kv + q * h + self.mlp_matrices * h * self.intermediate_size

    @property
    def linear_params(self) -> int:
        """Parameters every token multiplies through, LM head excluded (it runs on sampled tokens)."""
        return self.num_layers * self.layer_linear_params

    @property
    def weight_bytes_per_iteration(self) -> float:
        """Every layer's matrices and norms, the final norm and the LM head (the embedding lookup
        reads only a few rows, so a tied embedding counts once, as the LM head)."""
        norms = (2 * self.num_layers + 1) * self.hidden_size
        params = self.linear_params + norms + self.vocab_size * self.hidden_size
        return params * self.weight_bytes_per_param

    @property
    def kv_bytes_per_token(self) -> float:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.kv_bytes_per_elem

    def attention_flops(self, new_tokens: int, context_before: int) -> float:
        """QK^T and PV for `new_tokens` causal queries after `context_before` cached tokens."""
        keys_seen = new_tokens * context_before + new_tokens * (new_tokens + 1) / 2
        return 4.0 * self.num_layers * self.num_heads * self.head_dim * keys_seen


@dataclass(frozen=True)
class Iteration:
    prefill_lens: tuple[int, ...]  # prompts processed whole this iteration
    decode_contexts: tuple[int, ...]  # cached tokens of each request decoding one token

    @property
    def num_tokens(self) -> int:
        return sum(self.prefill_lens) + len(self.decode_contexts)

    @property
    def num_sampled(self) -> int:
        return len(self.prefill_lens) + len(self.decode_contexts)


def ideal_schedule(prompt_lens: Sequence[int], output_lens: Sequence[int], max_num_seqs: int) -> Iterator[Iteration]:
    """Iteration-level FCFS with every request present at the start: a request takes a seat as
    soon as one frees, prefills and emits its first token in one iteration, then one token each."""
    if max_num_seqs < 1:
        raise ValueError("max_num_seqs must be at least 1")
    waiting = deque(zip(prompt_lens, output_lens))
    running: list[list[int]] = []  # [cached tokens, tokens still to generate]
    while waiting or running:
        joined: list[tuple[int, int]] = []
        while waiting and len(running) + len(joined) < max_num_seqs:
            joined.append(waiting.popleft())
        yield Iteration(tuple(p for p, _ in joined), tuple(r[0] for r in running))
        for r in running:
            r[0] += 1
            r[1] -= 1
        # After its prefill a request has its prompt cached and its first token sampled.
        running = [r for r in running if r[1] > 0] + [[p, o - 1] for p, o in joined if o > 1]


def static_batch_iterations(output_lens: Sequence[int], max_num_seqs: int) -> int:
    """Iterations request-level batching needs: each batch of max_num_seqs runs for its longest
    output. Over `ideal_schedule`'s count, it bounds what iteration-level scheduling can gain when
    an iteration costs the same however few requests it holds."""
    return sum(max(output_lens[i:i + max_num_seqs]) for i in range(0, len(output_lens), max_num_seqs))


@dataclass(frozen=True)
class DeviceRates:
    """What the device was measured to do; `label` says which device, for the report."""

    copy_bandwidth: float  # bytes/s, read + written, of a large device-to-device copy
    matmul_flops: float  # flop/s of a large square matmul in the model's dtype
    label: str


def iteration_cost(dims: ModelDims, it: Iteration) -> tuple[float, float]:
    """(bytes moved, flops) of one iteration."""
    new_tokens = it.num_tokens
    kv_read = sum(it.decode_contexts) * dims.kv_bytes_per_token
    kv_written = new_tokens * dims.kv_bytes_per_token
    moved = dims.weight_bytes_per_iteration + kv_read + kv_written
    flops = 2.0 * dims.linear_params * new_tokens + 2.0 * dims.hidden_size * dims.vocab_size * it.num_sampled
    flops += sum(dims.attention_flops(p, 0) for p in it.prefill_lens)
    flops += sum(dims.attention_flops(1, c) for c in it.decode_contexts)
    return moved, flops


@dataclass
class Floor:
    seconds: float  # sum over iterations of max(memory time, compute time)
    memory_seconds: float  # all bytes over bandwidth (as if compute were free)
    compute_seconds: float  # all flops over the matmul rate (as if memory were free)
    num_iterations: int
    total_bytes: float
    total_flops: float
    output_tokens: int
    rates: DeviceRates

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds if self.seconds > 0 else float("inf")

    def fraction_achieved(self, elapsed_s: float) -> float:
        """Achieved throughput as a fraction of the floor's (1.0: at the physical limit)."""
        return self.seconds / elapsed_s if elapsed_s > 0 else float("nan")


def trace_floor(dims: ModelDims, prompt_lens: Sequence[int], output_lens: Sequence[int], max_num_seqs: int,
                rates: DeviceRates) -> Floor:
    total = mem_s = cmp_s = moved_all = flops_all = 0.0
    n = 0
    for it in ideal_schedule(prompt_lens, output_lens, max_num_seqs):
        moved, flops = iteration_cost(dims, it)
        t_mem, t_cmp = moved / rates.copy_bandwidth, flops / rates.matmul_flops
        total += max(t_mem, t_cmp)
        mem_s += t_mem
        cmp_s += t_cmp
        moved_all += moved
        flops_all += flops
        n += 1
    return Floor(total, mem_s, cmp_s, n, moved_all, flops_all, int(sum(output_lens)), rates)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_time(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up: allocation, kernel selection, caches
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def measure_device(device: torch.device, dtype: torch.dtype, copy_bytes: int | None = None,
                   matmul_n: int | None = None, repeats: int = 5) -> DeviceRates:
    """Best-of-`repeats` copy bandwidth and matmul rate; sizes default to ones that dwarf caches."""
    on_gpu = device.type == "cuda"
    copy_bytes = copy_bytes or (1 << 30 if on_gpu else 1 << 28)
    matmul_n = matmul_n or (8192 if on_gpu else 1024)
    src = torch.empty(copy_bytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    t_copy = _best_time(lambda: dst.copy_(src), device, repeats)
    a = torch.randn(matmul_n, matmul_n, device=device).to(dtype)
    b = torch.randn(matmul_n, matmul_n, device=device).to(dtype)
    t_mm = _best_time(lambda: a @ b, device, repeats)
    name = torch.cuda.get_device_name(device) if on_gpu else f"cpu ({torch.get_num_threads()} threads)"
    return DeviceRates(2.0 * copy_bytes / t_copy, 2.0 * matmul_n ** 3 / t_mm,
                       f"{name}, {str(dtype).removeprefix('torch.')}")
