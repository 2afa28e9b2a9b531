"""The fused CPU layer step (layers/fused_decode.py, decode_layers.c) against the module path it
replaces: at every iteration of a real engine run (prompts, decodes, and both together), the module path runs first on the same
input and caches, then the caches are restored and the fused step runs; the layers' outputs and
the keys and values each writes must agree to float rounding (both call the same matmul and
attention kernels; the element-wise steps differ only in summation order).

Models: tiny GGUF files of every family shape the fused step takes (block-32 and k-quant types,
Q4_K_M's mixed q/k/v runs, Qwen2's q/k/v bias, Qwen3's q/k norms, a sliding window), batches of
one and several requests of different lengths, blocks not consecutive in the pool.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType as T

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from gguf_files import tame_q6_k, tiny_model, write_gguf  # noqa: E402
from orcinus.config import EngineConfig
from orcinus.engine.llm_engine import LLMEngine
from orcinus.layers import fused_decode
from orcinus.sampling_params import SamplingParams

_DIMS = dict(vocab_size=256, hidden_size=256, intermediate_size=512, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)
PROMPTS = [[1, 17, 99, 200, 5, 42, 7, 8, 9], [1, 250, 3], list(range(2, 40))]
REL_TOL = 3e-4  # float rounding, which can flip a 16-bit activation rounding (one step: ~3e-5 of a block maximum) in a later layer


def _q4_k_m(name: str):
    if name in ("lm_head.weight", "model.embed_tokens.weight") or name.endswith("v_proj.weight"):
        return T.Q6_K
    return T.Q4_K


def _write(tmp_path, arch: str, qtype, **dims) -> str:
    config, state = tiny_model(arch, **{**_DIMS, **dims})
    path = str(tmp_path / f"tiny-{arch}.gguf")
    pick = qtype if callable(qtype) else (lambda name: qtype)
    write_gguf(path, arch, config, state, permute=arch == "llama", qtypes={n: pick(n) for n in state})
    if any(pick(n) == T.Q6_K for n in state):
        tame_q6_k(path)
    return path


def _engine(path: str, **overrides) -> LLMEngine:
    return LLMEngine(EngineConfig(model=path, skip_tokenizer_init=True, dtype="float32", device="cpu",
                                  kv_cache_memory=1 << 22, block_size=8, quantization="gguf", **overrides))


class _Checker:
    """Wraps fused_decode.decode: module path first, caches restored, then the fused step."""

    def __init__(self, monkeypatch) -> None:
        self.fused_steps = 0
        self.rows_seen: set[int] = set()
        self.worst = 0.0
        original = fused_decode.decode

        def checked(owner, layers, x, positions, ctx):
            saved = [(k.clone(), v.clone()) for k, v in ctx.kv_caches]
            ref = x
            for layer in layers:
                ref = layer(ref, positions, ctx)
            ref_caches = [(k.clone(), v.clone()) for k, v in ctx.kv_caches]
            for (k, v), (k0, v0) in zip(ctx.kv_caches, saved):
                k.copy_(k0)
                v.copy_(v0)
            out = original(owner, layers, x, positions, ctx)
            if out is None:
                for (k, v), (k1, v1) in zip(ctx.kv_caches, ref_caches):
                    k.copy_(k1)
                    v.copy_(v1)
                return ref
            self.fused_steps += 1
            self.rows_seen.add(x.shape[0])
            err = float((out - ref).norm() / ref.norm())
            self.worst = max(self.worst, err)
            assert err <= REL_TOL, f"layers' output differs by {err:.2e}"
            slots = ctx.meta.slot_mapping  # the pool's other slots hold whatever they held (maybe NaN)
            for i, pair in enumerate(zip(ctx.kv_caches, ref_caches)):
                for name, got, want in zip(("keys", "values"), *pair):
                    got, want = (t.flatten(0, 1)[slots] for t in (got, want))
                    assert float((got - want).norm() / want.norm()) <= REL_TOL, f"{name} of layer {i}"
            return out

        monkeypatch.setattr(fused_decode, "decode", checked)


def _generate(engine: LLMEngine, prompts=PROMPTS, max_tokens: int = 12) -> dict[str, list[int]]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", {"prompt_token_ids": p}, params)
    done: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    return done


CASES = {
    "llama-Q4_1": ("llama", T.Q4_1, {}),
    "llama-Q8_0": ("llama", T.Q8_0, {}),
    "llama-Q4_K_M": ("llama", _q4_k_m, {}),
    "llama-Q5_K": ("llama", T.Q5_K, {}),
    "qwen2-Q4_0 (q/k/v bias)": ("qwen2", T.Q4_0, {}),
    "qwen3-Q8_0 (q/k norms)": ("qwen3", T.Q8_0, {"head_dim": 64}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_fused_step_matches_module_path(tmp_path, monkeypatch, case: str) -> None:
    arch, qtype, dims = CASES[case]
    checker = _Checker(monkeypatch)
    engine = _engine(_write(tmp_path, arch, qtype, **dims))
    try:
        out = _generate(engine)
        assert sorted(out) == ["r0", "r1", "r2"] and all(len(t) == 12 for t in out.values())
    finally:
        engine.shutdown()
    # the prompts' iteration (9 + 3 + 38 rows) and 11 decode iterations of the three: all fused
    assert checker.fused_steps >= 12, checker.fused_steps
    assert {3, 50} <= checker.rows_seen


@pytest.mark.parametrize("case", ["llama-Q4_1", "qwen3-Q8_0 (q/k norms)"])
def test_prompt_chunks_beside_decodes(tmp_path, monkeypatch, case: str) -> None:
    """A token budget of 16 cuts the prompts into chunks that run after earlier chunks of the same
    prompt and beside other requests' decodes: every such mixed iteration takes the fused step."""
    arch, qtype, dims = CASES[case]
    checker = _Checker(monkeypatch)
    engine = _engine(_write(tmp_path, arch, qtype, **dims), max_num_batched_tokens=16)
    try:
        out = _generate(engine, prompts=[[1, 2, 3], list(range(5, 45)), list(range(60, 81))], max_tokens=8)
        assert all(len(t) == 8 for t in out.values())
    finally:
        engine.shutdown()
    # 3 + 40 + 21 prompt tokens at 16 a step: at least 4 steps mix chunks and decodes
    assert checker.fused_steps >= 12 and 16 in checker.rows_seen, (checker.fused_steps, checker.rows_seen)


def test_sliding_window_and_scattered_blocks(tmp_path, monkeypatch) -> None:
    """A window shorter than the context (the fused step passes each layer's window to the C
    attention), and a pool whose blocks were freed and reused out of order."""
    checker = _Checker(monkeypatch)
    engine = _engine(_write(tmp_path, "llama", T.Q4_0), max_num_seqs=4)
    try:
        model = engine.executor.driver_worker.runner.model
        for layer in model.model.layers:
            layer.self_attn.attn.sliding_window = 8
        model._fused_decode_plan = None  # packed at start-up with the checkpoint's (no) window: repack
        _generate(engine, prompts=[list(range(3, 30)), [5, 6]], max_tokens=3)  # blocks used, then freed
        _generate(engine, prompts=[[1, 2, 3], list(range(40, 75)), [9] * 20], max_tokens=20)
    finally:
        engine.shutdown()
    assert checker.fused_steps >= 19
    assert {1, 3} <= checker.rows_seen or 3 in checker.rows_seen


def test_switch_and_ineligible_batches(tmp_path, monkeypatch) -> None:
    """ORCINUS_FUSED_DECODE=0 keeps the module path; so does a hooked layer; outputs are the same
    tokens either way."""
    path = _write(tmp_path, "llama", T.Q4_1)
    calls: list[bool] = []
    original = fused_decode.decode

    def counted(owner, layers, x, positions, ctx):
        out = original(owner, layers, x, positions, ctx)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(fused_decode, "decode", counted)
    engine = _engine(path)
    try:
        fused = _generate(engine)
    finally:
        engine.shutdown()
    assert all(calls) and len(calls) == 12  # the prompts, then 11 decodes: all fused

    calls.clear()
    monkeypatch.setenv(fused_decode.ENV_SWITCH, "0")
    engine = _engine(path)
    try:
        assert _generate(engine) == fused
    finally:
        engine.shutdown()
    assert calls and not any(calls)

    calls.clear()
    monkeypatch.delenv(fused_decode.ENV_SWITCH)
    engine = _engine(path)
    try:
        seen: list[int] = []
        layer = engine.executor.driver_worker.runner.model.model.layers[0]
        handle = layer.register_forward_hook(lambda m, i, o: seen.append(o.shape[0]))
        assert _generate(engine) == fused
        handle.remove()
    finally:
        engine.shutdown()
    assert not any(calls) and len(seen) == 12  # a user's hook sees every iteration


def test_float_weights_take_the_module_path(tmp_path) -> None:
    """--quantization none: no quantized linears, so no plan (the module path runs)."""
    engine = LLMEngine(EngineConfig(model=_write(tmp_path, "llama", T.Q4_1), skip_tokenizer_init=True,
                                    dtype="float32", device="cpu", kv_cache_memory=1 << 22, block_size=8,
                                    quantization="none"))
    try:
        _generate(engine, max_tokens=3)
        model = engine.executor.driver_worker.runner.model
        assert getattr(model, "_fused_decode_plan", None) is fused_decode._NO_PLAN
    finally:
        engine.shutdown()


def test_a_float16_pool_is_written_and_read_as_the_module_path_does(tmp_path, monkeypatch) -> None:
    """kv_cache_dtype=float16: the C step rounds the new keys and values to halves as torch's
    conversion does (nearest even) and its attention reads them back, at every iteration."""
    checker = _Checker(monkeypatch)
    engine = _engine(_write(tmp_path, "llama", T.Q4_1), kv_cache_dtype="float16", max_num_batched_tokens=16)
    try:
        caches = engine.executor.driver_worker.runner.kv_caches
        assert all(k.dtype == v.dtype == torch.float16 for k, v in caches)
        out = _generate(engine, prompts=[[1, 2, 3], list(range(5, 45))], max_tokens=10)
        assert all(len(t) == 10 for t in out.values())
    finally:
        engine.shutdown()
    assert checker.fused_steps >= 10 and 16 in checker.rows_seen


def test_float_to_half_rounds_as_torch_does() -> None:
    """The C step's conversion of new keys and values (decode_layers.c `f32_to_f16`) against torch's,
    bit for bit: normals, ties, the halves' subnormals and their underflow, overflow to infinity,
    infinities, NaN and signed zeros."""
    import ctypes

    special = [0.0, -0.0, 1.0, -2.5, 65504.0, 65519.0, 65520.0, 1e6, -1e6, float("inf"), float("-inf"),
               6.0e-8, 3.0e-8, 2.9e-8, 1.0e-5, -6.1e-5, 0.1, 1 / 3, 2049.0, 2051.0, 1.00048828125]
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.tensor(special), torch.randn(20000, generator=g) * 10,
                   torch.randn(20000, generator=g) * 1e-5, torch.randn(2000, generator=g) * 3e4]).contiguous()
    got = torch.empty(x.numel(), dtype=torch.int16)
    lib = fused_decode._load()
    assert lib is not None
    lib.orcinus_f32_to_f16.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    lib.orcinus_f32_to_f16(x.data_ptr(), got.data_ptr(), x.numel())
    want = x.to(torch.float16).view(torch.int16)
    assert torch.equal(got, want), (x[got != want][:5], got[got != want][:5], want[got != want][:5])
    nan = torch.tensor([float("nan")])
    one = torch.empty(1, dtype=torch.int16)
    lib.orcinus_f32_to_f16(nan.data_ptr(), one.data_ptr(), 1)
    assert torch.isnan(one.view(torch.float16)).all()
