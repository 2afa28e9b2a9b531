"""kv_cache_dtype: the KV pool's element type, through the offline API and the CLI's parser.

A float16 pool for the (float32) default model on CPU holds twice the tokens in the same memory,
and the model's numbers move only by the rounding of keys and values to halves: its prompt
log-probs stay within 0.02 of the float32 pool's (and do move, so the pool really is float16).
`auto` takes float16 where the weights stay in GGUF blocks on CPU (float32 activations), and the
model's dtype elsewhere."""
from __future__ import annotations

import argparse

import pytest
import torch

from orcinus import LLM, SamplingParams
from orcinus.config import EngineConfig
from orcinus.engine.arg_utils import add_engine_args, engine_config_from_args
from orcinus.errors import ConfigError
from orcinus.executor.model_runner import resolve_kv_dtype

PROMPT = ("The Orca paper schedules at the granularity of iterations: requests join and leave the "
          "batch between iterations, and attention alone is computed per request.")
MEMORY = 8 << 20


def _prompt_logprobs(llm: LLM) -> list[float]:
    out = llm.generate([PROMPT], SamplingParams(max_tokens=4, temperature=0.0, prompt_logprobs=0), use_tqdm=False)[0]
    ids = out.prompt_token_ids
    return [entry[ids[i]].logprob for i, entry in enumerate(out.prompt_logprobs) if entry is not None]


def test_a_float16_pool_holds_twice_the_tokens_and_keeps_the_numbers():
    full = LLM(kv_cache_memory=MEMORY, dtype="float32", kv_cache_dtype="float32")
    half = LLM(kv_cache_memory=MEMORY, dtype="float32", kv_cache_dtype="float16")
    try:
        pools = [llm.engine.executor.driver_worker.runner.kv_caches for llm in (full, half)]
        assert pools[0][0][0].dtype == torch.float32 and pools[1][0][0].dtype == torch.float16
        assert half.engine.kv_cache.n_slots >= 2 * full.engine.kv_cache.n_slots - half.engine.kv_cache.block_size
        want, got = _prompt_logprobs(full), _prompt_logprobs(half)
    finally:
        full.engine.shutdown()
        half.engine.shutdown()
    assert len(want) == len(got) > 20
    diff = max(abs(a - b) for a, b in zip(want, got))
    assert 0 < diff < 0.02, diff


def test_bad_values_are_refused_with_the_choices():
    with pytest.raises(ConfigError, match="kv_cache_dtype='int8' is unknown; choose auto or one of"):
        EngineConfig(kv_cache_dtype="int8")
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    assert engine_config_from_args(parser.parse_args(["--kv-cache-dtype", "float16"])).kv_cache_dtype == "float16"
    with pytest.raises(SystemExit):
        parser.parse_args(["--kv-cache-dtype", "fp8"])


def _pool_dtype(llm: LLM) -> torch.dtype:
    try:
        return llm.engine.executor.driver_worker.runner.kv_caches[0][0].dtype
    finally:
        llm.engine.shutdown()


def test_auto_is_half_beside_gguf_blocks_and_the_model_dtype_elsewhere(checkpoint_factory):
    assert _pool_dtype(LLM(kv_cache_memory=MEMORY, dtype="float32")) == torch.float16  # the default GGUF, kept in blocks
    assert _pool_dtype(LLM(kv_cache_memory=MEMORY, dtype="float32", quantization="none")) == torch.float32
    folder, _ = checkpoint_factory("llama")  # a Hugging Face folder: float32 weights
    assert _pool_dtype(LLM(model=folder, kv_cache_memory=MEMORY, dtype="float32")) == torch.float32


def test_auto_is_the_model_dtype_and_cuda_keeps_it():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_kv_dtype("auto", torch.bfloat16, cpu) == torch.bfloat16
    assert resolve_kv_dtype("auto", torch.float32, cpu, weights_quantized=True) == torch.float16
    assert resolve_kv_dtype("auto", torch.bfloat16, cpu, weights_quantized=True) == torch.bfloat16
    assert resolve_kv_dtype("float16", torch.float32, cpu) == torch.float16
    assert resolve_kv_dtype("bfloat16", torch.bfloat16, cuda) == torch.bfloat16
    with pytest.raises(ConfigError, match="supported on CPU only"):
        resolve_kv_dtype("float16", torch.bfloat16, cuda)
