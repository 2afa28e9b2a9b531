"""`bench offline --profile`'s phase timer: every phase is entered once per iteration, nothing is
counted twice, and the engine's methods are restored afterwards."""
from __future__ import annotations

import pytest

from orcinus.bench.profile import profile_phases
from orcinus.engine.llm import LLM
from orcinus.executor.model_runner import ModelRunner
from orcinus.sampling_params import SamplingParams


def test_phases_count_each_iteration_once_and_are_restored(checkpoint_factory):
    folder, _ = checkpoint_factory("llama")
    llm = LLM(folder, skip_tokenizer_init=True, dtype="float32", kv_cache_memory=1 << 22, block_size=4, max_num_seqs=2)
    original = ModelRunner.prepare
    prompts = [{"prompt_token_ids": [5, 6, 7]}, {"prompt_token_ids": [8, 9]}, {"prompt_token_ids": [10]}]
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    with profile_phases() as prof:
        llm.generate(prompts, params, use_tqdm=False)
    assert ModelRunner.prepare is original
    iterations = llm.engine.iterations_total
    assert prof.iterations == iterations > 0
    assert prof.calls["input preparation"] == prof.calls["sampling"] == iterations
    assert prof.calls["output processing (detokenisation)"] > 0
    assert all(s >= 0 for s in prof.seconds.values())
    assert prof.engine_thread_s() <= prof.total_s  # the forward thread's phases overlap it
    assert prof.calls["waiting for the iteration"] == iterations
    assert [r[0] for r in prof.rows()][-1] == "other"


def test_offline_detokenize_times_the_text_work(tmp_path, monkeypatch, capsys):
    """`bench offline --detokenize --profile`: the tokenizer is loaded and every output token is
    detokenised, inside the profile's text phase."""
    import json

    import transformers as tf
    from checkpoints import build_from_config

    from orcinus.cli import main
    from orcinus.models.loader import default_model_path
    from orcinus.tokenizer import StreamDetokenizer, Tokenizer

    tok = Tokenizer.from_model_path(default_model_path())
    folder = str(tmp_path / "model")
    build_from_config(tf.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                     max_position_embeddings=256, bos_token_id=1, eos_token_id=2), folder)
    tok.hf.save_pretrained(folder)
    detokenised = []
    original = StreamDetokenizer.add_token
    monkeypatch.setattr(StreamDetokenizer, "add_token", lambda self, t: detokenised.append(t) or original(self, t))
    out = tmp_path / "offline.json"
    argv = ["bench", "offline", "--model", folder, "--num-requests", "3", "--prompt-len", "4:8", "--output-len", "3:5",
            "--backends", "orca", "--profile", "--detokenize", "--no-floor", "--no-progress", "--output-json", str(out)]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    (result,) = report["results"]
    assert result["status"] == "ok" and report["settings"]["detokenize"] is True
    # every timed token, and the warm-up's: the trace's 3 requests, 4 tokens each
    assert len(detokenised) == result["output_tokens"] + 3 * 4
    assert result["profile"]["calls"]["output processing (detokenisation)"] > 0
    # the KV recorder wraps the step inside the profiler: the step total is measured
    assert result["profile"]["total_s"] >= result["profile"]["seconds"]["output processing (detokenisation)"] > 0
    assert "output processing (detokenisation)" in capsys.readouterr().out


@pytest.mark.gpu
def test_on_cuda_forward_and_sampling_are_timed_with_cuda_events(checkpoint_factory):
    """The forward pass only enqueues kernels; with events its GPU time lands in "forward", not in
    the sampling that waits for it."""
    folder, _ = checkpoint_factory("llama")
    llm = LLM(folder, skip_tokenizer_init=True, dtype="bfloat16", device="cuda", kv_cache_memory=1 << 24,
              block_size=16, max_num_seqs=4)
    prompts = [{"prompt_token_ids": list(range(3, 3 + n))} for n in (50, 120, 7, 300)]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    with profile_phases(llm.engine.device) as prof:
        llm.generate(prompts, params, use_tqdm=False)
    assert prof.device_timed == ["forward", "sampling"]
    assert prof.seconds["forward"] > 0 and prof.seconds["sampling"] > 0
    assert set(prof.host_seconds) == {"forward", "sampling"}
    assert "GPU time" in prof.to_markdown()
