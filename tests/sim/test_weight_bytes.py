"""The cost model's weight bytes come from the loaded model: a GGUF checkpoint kept quantized is
counted in its blocks (Q4_1: 20 bytes per 32 weights, Q8_0: 34), equal to the hand-computed
sizes, and the quantized path's regimes (integer kernel below the crossover, dequantisation from
it up) price the right weights."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType as T

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from gguf_files import tiny_model, write_gguf  # noqa: E402

from orcinus.config import EngineConfig  # noqa: E402
from orcinus.engine.llm_engine import LLMEngine  # noqa: E402
from orcinus.layers import quant_native  # noqa: E402
from orcinus.layers.quantized_linear import dequant_min_rows  # noqa: E402
from orcinus.sim.calibrate import loaded_weight_info  # noqa: E402
from orcinus.sim.cost_model import BatchShape, CostModel, Parallel  # noqa: E402
from orcinus.sim.hardware import load_hardware  # noqa: E402
from orcinus.sim.shapes import ModelShape  # noqa: E402
from orcinus.layers import packed_weights  # noqa: E402
from orcinus.sim.weight_bytes import WeightInfo, lookup_weight_info, store_weight_info  # noqa: E402

needs_kernel = pytest.mark.skipif(quant_native.load() is None, reason="no C compiler: weights are dequantised")

HIDDEN, INTER, LAYERS, VOCAB = 256, 512, 2, 256
# per layer: q (256x256), k and v (128x256: 2 KV heads of 64), o (256x256), gate and up (512x256), down (256x512)
LAYER_ELEMENTS = 256 * 256 * 2 + 128 * 256 * 2 + 512 * 256 * 3
LAYER_BYTES = LAYER_ELEMENTS // 32 * 20 + 2 * HIDDEN * 4  # Q4_1 blocks + two float32 norms
HEAD_BYTES = VOCAB * HIDDEN // 32 * 34  # Q8_0


@pytest.fixture(scope="module")
def quantized_checkpoint(tmp_path_factory) -> str:
    config, state = tiny_model("llama", vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER,
                               num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=256)
    path = str(tmp_path_factory.mktemp("q") / "tiny-q4_1.gguf")
    qtypes = {n: T.Q8_0 if n in ("lm_head.weight", "model.embed_tokens.weight") else T.Q4_1 for n in state}
    write_gguf(path, "llama", config, state, permute=True, qtypes=qtypes)
    return path


@needs_kernel
def test_loaded_quantized_weights_count_their_blocks(quantized_checkpoint) -> None:
    engine = LLMEngine(EngineConfig(model=quantized_checkpoint, skip_tokenizer_init=True, dtype="float32",
                                    device="cpu", kv_cache_memory=1 << 22, quantization="gguf"))
    try:
        info = loaded_weight_info(engine)
    finally:
        engine.shutdown()
    # With the AVX-512 tiles the tied Q8_0 head is packed at load (layers/packed_weights.py): 36 bytes
    # per 32 weights instead of 34; Q4_1 keeps its 20.
    lib = quant_native.load()
    head = HEAD_BYTES // 34 * 36 if lib.orcinus_quant_tile_rows() > 0 and packed_weights.enabled() else HEAD_BYTES
    assert info == WeightInfo(layer_bytes=LAYER_BYTES, lm_head_bytes=head, embedding_bytes=head,
                              layer_quant_elements=LAYER_ELEMENTS, lm_head_quant_elements=VOCAB * HIDDEN,
                              dequant_min_rows=dequant_min_rows(torch.float32))
    # the same file dequantised: float32 weights, nothing in blocks
    engine = LLMEngine(EngineConfig(model=quantized_checkpoint, skip_tokenizer_init=True, dtype="float32",
                                    device="cpu", kv_cache_memory=1 << 22, quantization="none"))
    try:
        plain = loaded_weight_info(engine)
    finally:
        engine.shutdown()
    assert plain.layer_bytes == LAYER_ELEMENTS * 4 + 2 * HIDDEN * 4 and not plain.quantized


SHAPE = ModelShape("tiny", LAYERS, HIDDEN, 4, 2, 64, INTER, VOCAB, 256)
INFO = WeightInfo(LAYER_BYTES, HEAD_BYTES, HEAD_BYTES, LAYER_ELEMENTS, VOCAB * HIDDEN, 32)


def test_cost_model_reads_the_held_bytes_and_picks_the_quantized_path() -> None:
    assert SHAPE.layer_linear_params == LAYER_ELEMENTS
    cost = CostModel(ModelShape(**{**SHAPE.__dict__, "weights": INFO}), load_hardware("xeon-2core"), Parallel(),
                     "float32")
    decode = cost.stage_work(BatchShape.of([(1, 40, True)] * 8), 0)  # 8 rows: the integer kernel
    assert decode.gemm_bytes == LAYER_BYTES * LAYERS + HEAD_BYTES
    assert decode.qdot_flops == pytest.approx(2 * 8 * (LAYER_ELEMENTS * LAYERS + VOCAB * HIDDEN))
    assert decode.gemm_flops == pytest.approx(0.0) and decode.dequant_bytes == 0
    wide = cost.stage_work(BatchShape.of([(1, 40, True)] * 40), 0)  # 40 rows: dequantise, then a float32 GEMM
    assert wide.dequant_bytes == (LAYER_ELEMENTS * LAYERS + VOCAB * HIDDEN) * 4 and wide.qdot_flops == 0
    prompt = cost.stage_work(BatchShape.of([(100, 0, True)]), 0)  # 100 tokens, one sampled row
    assert prompt.dequant_bytes == LAYER_ELEMENTS * LAYERS * 4  # the LM head (1 row) stays on the kernel
    assert prompt.qdot_flops == pytest.approx(2 * VOCAB * HIDDEN)
    # the pool's room: weights as held (tied? no: embedding and LM head both count)
    assert cost.weight_bytes_per_device(0) == LAYER_BYTES * LAYERS + 2 * HEAD_BYTES
    plain = CostModel(SHAPE, load_hardware("xeon-2core"), Parallel(), "float32")
    assert plain.stage_work(BatchShape.of([(1, 40, True)]), 0).gemm_bytes == (LAYER_ELEMENTS * LAYERS
                                                                             + VOCAB * HIDDEN) * 4


def test_weight_info_store_round_trip(tmp_path) -> None:
    path = str(tmp_path / "weights.json")
    store_weight_info("a|auto|float32", INFO, path)
    store_weight_info("b|none|float32", WeightInfo(1.0, 2.0, 3.0), path)
    assert lookup_weight_info("a|auto|float32", path) == INFO
    assert lookup_weight_info("c|auto|float32", path) is None


def test_simulating_a_calibrated_model_uses_its_stored_bytes(quantized_checkpoint, tmp_path, monkeypatch) -> None:
    from orcinus.sim.bench_hooks import target_from
    from orcinus.sim.weight_bytes import model_key

    monkeypatch.setenv("ORCINUS_CACHE", str(tmp_path))
    config = EngineConfig(model=quantized_checkpoint, dtype="float32")
    assert target_from(config, "xeon-2core").shape.weights is None  # never measured: dtype-sized weights
    store_weight_info(model_key(quantized_checkpoint, "auto", "float32"), INFO)
    assert target_from(config, "xeon-2core").shape.weights == INFO
    assert target_from(EngineConfig(model=quantized_checkpoint, dtype="float32", quantization="none"),
                       "xeon-2core").shape.weights is None  # another way of holding the weights
