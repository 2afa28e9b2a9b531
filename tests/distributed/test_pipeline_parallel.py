"""Pipeline parallelism on CPU (gloo): greedy tokens with PP=2 and TP=2 x PP=2 equal a single
process and transformers; batches overlap across stages (Orca's n_workers, no micro-batches),
shown by causality of per-stage timestamps; impossible splits are refused before start-up."""
from __future__ import annotations

import multiprocessing

import pytest
import torch

from orcinus.config import EngineConfig
from orcinus.engine.llm_engine import LLMEngine
from orcinus.sampling_params import SamplingParams
from references import hf_generate_greedy

GREEDY = dict(temperature=0.0, ignore_eos=True)
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [20, 21, 22, 23, 24, 25, 26, 27, 28], [30, 31], [40, 41, 42, 43]]
MAX_NEW = [6, 9, 4, 7, 5]


def _engine(folder: str, tp: int = 1, pp: int = 1) -> LLMEngine:
    # max_num_seqs=2: the five requests form several disjoint batches, so the pipeline can fill.
    return LLMEngine(EngineConfig(model=folder, skip_tokenizer_init=True, dtype="float32", kv_cache_memory=1 << 22,
                                  block_size=4, max_num_seqs=2, tensor_parallel_size=tp,
                                  pipeline_parallel_size=pp))


def _generate(engine: LLMEngine) -> dict[str, list[int]]:
    for i, p in enumerate(PROMPTS):
        engine.add_request(f"r{i}", {"prompt_token_ids": p}, SamplingParams(max_tokens=MAX_NEW[i], **GREEDY))
    results = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                results[out.request_id] = out.outputs[0].token_ids
    assert engine.free_all_check()
    return results


# Every family: llama (GQA), qwen3 (tied embeddings split across stages), gpt2 (learned positions
# and fused Conv1D q/k/v on the first stage), opt (narrower word embeddings: project_in on the first
# stage, project_out before the tied head on the last).
@pytest.mark.parametrize("arch, tp, pp", [("llama", 1, 2), ("qwen3", 1, 2), ("llama", 2, 2), ("gpt2", 1, 2),
                                          ("gpt2", 2, 2), ("opt", 1, 2), ("opt", 2, 2)])
def test_pipeline_greedy_equals_single_process_and_transformers(arch, tp, pp, checkpoint_factory):
    folder, hf_model = checkpoint_factory(arch)
    engine = _engine(folder, tp, pp)
    try:
        got = _generate(engine)
        timings = list(engine.executor.stage_timings)
    finally:
        engine.shutdown()
    assert not multiprocessing.active_children()
    assert got == _generate(_engine(folder))
    for i, p in enumerate(PROMPTS):
        assert got[f"r{i}"] == hf_generate_greedy(hf_model, p, MAX_NEW[i])
    assert {stage for stage, *_ in timings} == set(range(pp))


def test_per_layer_windows_follow_model_wide_layer_indices_on_later_stages(tmp_path):
    """Qwen2 with max_window_layers=2 of 3: only layer 2 slides. On stage 1 it is the stage's first
    layer (KV index 0), yet it must still slide, as in transformers."""
    import transformers as tf

    from checkpoints import build_from_config

    cfg = tf.Qwen2Config(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         initializer_range=0.3, bos_token_id=1, eos_token_id=2, use_sliding_window=True,
                         sliding_window=8, max_window_layers=2)
    hf_model = build_from_config(cfg, str(tmp_path))
    engine = _engine(str(tmp_path), pp=2)
    prompt = list(range(40, 70))  # 30 tokens: far past the window of 8
    try:
        engine.add_request("r", {"prompt_token_ids": prompt}, SamplingParams(max_tokens=6, **GREEDY))
        got = None
        while engine.has_unfinished_requests():
            for out in engine.step():
                got = out.outputs[0].token_ids
    finally:
        engine.shutdown()
    assert got == hf_generate_greedy(hf_model, prompt, 6)


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory) -> str:
    """Wider than the other test models, so that a stage's work outweighs the control messages
    and process scheduling on a busy machine (the overlap below is then routine, not luck)."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=320, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    folder = str(tmp_path_factory.mktemp("wide-llama"))
    tf.LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def test_stage_zero_starts_the_next_batch_before_the_last_stage_finishes(wide_llama):
    engine = LLMEngine(EngineConfig(model=wide_llama, skip_tokenizer_init=True, dtype="float32",
                                    kv_cache_memory=1 << 24, block_size=4, max_num_seqs=4, pipeline_parallel_size=2))
    # Messages are numbered 1, 2, ... in the order the executor receives them. A message without
    # requests (only ids to drop) needs nothing from stage 0, so only those with requests are
    # bound by the pipeline's causality.
    carried: list[bool] = []
    execute_async = engine.executor.execute_async
    engine.executor.execute_async = lambda msg: carried.append(bool(msg.requests)) or execute_async(msg)
    try:
        for i in range(8):  # two disjoint batches of four keep both stages fed
            engine.add_request(f"r{i}", {"prompt_token_ids": list(range(5 + i, 30 + i))},
                               SamplingParams(max_tokens=12, **GREEDY))
        while engine.has_unfinished_requests():
            engine.step()
        timings = list(engine.executor.stage_timings)
    finally:
        engine.shutdown()
    start = {seq: s for stage, seq, s, _ in timings if stage == 0}
    end_last = {seq: e for stage, seq, _, e in timings if stage == 1}
    seqs = sorted(q for q in end_last if carried[q - 1])
    assert len(seqs) >= 20
    # Causality within a batch: the last stage cannot finish before the first stage started it.
    assert all(start[q] < end_last[q] for q in seqs)
    # Pipelining: batch i+1 entered stage 0 while batch i was still in the last stage.
    overlapped = [q for q in seqs[:-1] if q + 1 in start and start[q + 1] < end_last[q]]
    assert overlapped, timings


def test_impossible_pipeline_splits_are_refused(checkpoint_factory):
    llama, _ = checkpoint_factory("llama")  # 2 layers
    with pytest.raises(ValueError, match="pipeline_parallel_size=3 exceeds the model's 2 layers"):
        _engine(llama, pp=3)
    gpt2, _ = checkpoint_factory("gpt2")  # every family is split by the same rule
    with pytest.raises(ValueError, match="pipeline_parallel_size=3 exceeds the model's 2 layers"):
        _engine(gpt2, pp=3)
    assert not multiprocessing.active_children()
