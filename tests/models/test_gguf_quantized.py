"""GGUF models with their weights kept quantized (`quantization="gguf"`) against the same file
dequantised to float32 (`quantization="none"`, whose weights equal `gguf.quants.dequantize`, see
test_gguf_quant_types.py): weights really stay in their blocks, per-layer outputs and logits agree
within the stated tolerance for every supported type, tensor parallelism splits the blocks.

Tolerance: the quantized path rounds each linear layer's input to 8 bits per block of 32 (as
llama.cpp does), a relative error of at most 1/254 per element; over a layer's seven products and
two layers it stays under 5 % of each hidden state's norm here (the measured values are ~0.5-2 %),
which is the bound asserted per layer; logits likewise, relative to the logits' norm.
"""
from __future__ import annotations

import multiprocessing
import os

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from gguf_files import tame_q6_k, tiny_model, write_gguf
from orcinus.config import EngineConfig
from orcinus.engine.llm_engine import LLMEngine
from orcinus.layers.quantized_linear import QUANT_TYPES, keep_quantized, quantized, quantized_bytes
from orcinus.models.gguf_loader import read_gguf_header
from orcinus.sampling_params import SamplingParams
from references import capture_logits

_DIMS = dict(vocab_size=256, hidden_size=256, intermediate_size=512, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)
PROMPTS = [[1, 17, 99, 200, 5, 42, 7, 8, 9], [1, 250, 3]]
REL_TOL = 0.05


def _q4_k_m(name: str):
    if name in ("lm_head.weight", "model.embed_tokens.weight") or name.endswith("v_proj.weight"):
        return T.Q6_K
    return T.Q4_K


MIXES = {"Q4_0": lambda n: T.Q4_0, "Q4_1": lambda n: T.Q4_1, "Q8_0": lambda n: T.Q8_0,
         "Q4_K_M": _q4_k_m, "Q5_K": lambda n: T.Q5_K, "Q6_K": lambda n: T.Q6_K}


def _write(tmp_path, mix: str, arch: str = "llama", **dims) -> str:
    config, state = tiny_model(arch, **{**_DIMS, **dims})
    if dims.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)  # as llama.cpp writes tied models: no output.weight
    path = str(tmp_path / f"tiny-{arch}-{mix}.gguf")
    write_gguf(path, arch, config, state, permute=arch == "llama", qtypes={n: MIXES[mix](n) for n in state})
    tame_q6_k(path)
    return path


def _engine(path: str, mode: str, tp: int = 1) -> LLMEngine:
    return LLMEngine(EngineConfig(model=path, skip_tokenizer_init=True, dtype="float32", device="cpu",
                                  kv_cache_memory=1 << 22, block_size=8, quantization=mode,
                                  tensor_parallel_size=tp))


def _run(engine: LLMEngine, max_tokens: int = 8) -> dict[str, list[int]]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(PROMPTS):
        engine.add_request(f"r{i}", {"prompt_token_ids": p}, params)
    done: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    return done


def _layer_outputs(engine: LLMEngine) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Every decoder layer's output and the logits of the first iteration (both prompts' prefill)."""
    model = engine.executor.driver_worker.runner.model
    captured: list[torch.Tensor] = []
    hooks = [layer.register_forward_hook(lambda m, i, o: captured.append(o.detach().clone()))
             for layer in model.model.layers]
    logits = capture_logits(engine)
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(PROMPTS):
        engine.add_request(f"p{i}", {"prompt_token_ids": p}, params)
    while engine.has_unfinished_requests():
        engine.step()
    for h in hooks:
        h.remove()
    return captured[:len(model.model.layers)], logits[:1]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("mix", sorted(MIXES))
def test_quantized_model_matches_dequantised_float32(tmp_path, mix: str) -> None:
    path = _write(tmp_path, mix)
    quant, ref = _engine(path, "gguf"), _engine(path, "none")
    try:
        qmodel = quant.executor.driver_worker.runner.model
        rmodel = ref.executor.driver_worker.runner.model
        # The linear weights stay in their blocks: as many bytes as the file stores for them, or,
        # packed for the register tiles (layers/packed_weights.py), at most 2 bytes more per 32
        # weights (Q4_0: 20 instead of 18; Q4_1 stays 20, Q8_0 36 instead of 34).
        header = read_gguf_header(path)
        file_quant_bytes = sum(t.nbytes for t in header.tensors if t.ggml_type in QUANT_TYPES)
        q_bytes, _ = quantized_bytes(qmodel)
        assert file_quant_bytes <= q_bytes <= file_quant_bytes * 20 / 18
        assert quantized(rmodel.model.layers[0].mlp.gate_up_proj.weight) is None
        assert quantized(qmodel.model.layers[0].mlp.gate_up_proj.weight) is not None
        q_layers, q_logits = _layer_outputs(quant)
        r_layers, r_logits = _layer_outputs(ref)
        assert len(q_layers) == len(r_layers) == 2
        for i, (a, b) in enumerate(zip(q_layers, r_layers)):
            assert _rel(a, b) <= REL_TOL, f"layer {i}: {_rel(a, b):.4f}"
        assert _rel(q_logits[0], r_logits[0]) <= REL_TOL
    finally:
        quant.shutdown()
        ref.shutdown()


def test_tp2_quantized_equals_tp1(tmp_path) -> None:
    """Q4_0 splits at block boundaries everywhere (o_proj's 256 inputs -> 128 a rank); Q4_K_M's
    256-element blocks do not (o_proj), so that shard is dequantised and the rest stays quantized."""
    for mix in ("Q4_0", "Q4_K_M"):
        path = _write(tmp_path, mix)
        single = _engine(path, "gguf")
        try:
            expected = _run(single)
        finally:
            single.shutdown()
        engine = _engine(path, "gguf", tp=2)
        try:
            assert _run(engine) == expected, mix
        finally:
            engine.shutdown()
    assert not multiprocessing.active_children()


def test_tied_embedding_and_qwen(tmp_path) -> None:
    """qwen3 (q/k norms), tied embeddings: the embedding and LM head share one quantized tensor."""
    path = _write(tmp_path, "Q8_0", arch="qwen3", tie_word_embeddings=True, head_dim=64)
    quant, ref = _engine(path, "gguf"), _engine(path, "none")
    try:
        model = quant.executor.driver_worker.runner.model
        assert model.lm_head.weight is model.model.embed_tokens.weight
        assert quantized(model.lm_head.weight) is not None
        q_layers, q_logits = _layer_outputs(quant)
        r_layers, r_logits = _layer_outputs(ref)
        assert _rel(q_logits[0], r_logits[0]) <= REL_TOL
    finally:
        quant.shutdown()
        ref.shutdown()


def test_default_model_weights_at_file_size() -> None:
    """The default model (SmolLM2-135M Q4_1, Q8_0 embedding) holds ~its file's size of weights."""
    from orcinus.layers.quant_native import load
    from orcinus.models.loader import default_model_path, load_model

    if load() is None:
        pytest.fail("the quantized C kernel did not build")
    path = default_model_path()
    loaded = load_model(None, torch.float32, torch.device("cpu"), keep_quantized=True)
    q_bytes, all_bytes = quantized_bytes(loaded.model)
    size = os.path.getsize(path)
    assert 0.9 * size <= all_bytes <= 1.1 * size, (all_bytes, size)
    assert q_bytes >= 0.95 * all_bytes


def test_quantization_setting_is_checked() -> None:
    from orcinus.config import ConfigError

    with pytest.raises(ConfigError, match="quantization='int3' is unknown"):
        EngineConfig(quantization="int3")
    with pytest.raises(ConfigError, match="CPU only"):
        keep_quantized("gguf", torch.device("cuda"))
    assert keep_quantized("auto", torch.device("cuda")) is False
    assert keep_quantized("none", torch.device("cpu")) is False
    assert keep_quantized("auto", torch.device("cpu")) is True  # the kernel builds here
