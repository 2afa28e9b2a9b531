"""`bench offline --profile`'s phase timer, an observer of the engine: every phase is entered once
per iteration, nothing is counted twice, and the engine stops timing when the block ends."""
from __future__ import annotations

import pytest

from orcinus.bench.profile import profile_phases
from orcinus.engine.llm import LLM
from orcinus.sampling_params import SamplingParams


def test_phases_count_each_iteration_once_and_timing_stops_afterwards(checkpoint_factory, monkeypatch):
    folder, _ = checkpoint_factory("llama")
    llm = LLM(folder, skip_tokenizer_init=True, dtype="float32", kv_cache_memory=1 << 22, block_size=4, max_num_seqs=2)
    prompts = [{"prompt_token_ids": [5, 6, 7]}, {"prompt_token_ids": [8, 9]}, {"prompt_token_ids": [10]}]
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    with profile_phases(llm.engine) as prof:
        llm.generate(prompts, params, use_tqdm=False)
    iterations = llm.engine.iterations_total
    assert prof.iterations == iterations > 0
    assert prof.calls["input preparation"] == prof.calls["sampling"] == iterations
    assert prof.calls["output processing (detokenisation)"] > 0
    assert all(s >= 0 for s in prof.seconds.values())
    assert prof.engine_thread_s() <= prof.total_s  # the forward thread's phases overlap it
    assert prof.calls["waiting for the iteration"] == iterations
    assert [r[0] for r in prof.rows()][-1] == "other"
    # Afterwards the engine times nothing: messages are not timed, no phase reaches the reply.
    assert not llm.engine._phase_observers and not llm.engine._observers
    sent, replies = [], []
    executor = llm.engine.executor
    send = executor.execute_async

    def execute_async(msg):
        sent.append(msg.timed)
        future = send(msg)
        future.add_done_callback(lambda f: replies.append(f.result().phases))
        return future

    monkeypatch.setattr(executor, "execute_async", execute_async)
    seen = []
    llm.engine.add_observer(seen.append)  # an observer that did not ask for phases
    llm.generate(prompts, params, use_tqdm=False)
    assert sent and not any(sent) and replies == [None] * len(replies)
    assert seen and all(it.phases is None for it in seen)


def test_worker_reports_its_phases_only_when_the_message_asks(checkpoint_factory):
    """The worker's side travels as plain data in the reply, so a multi-process executor carries it too."""
    import pickle

    folder, _ = checkpoint_factory("llama")
    llm = LLM(folder, skip_tokenizer_init=True, dtype="float32", kv_cache_memory=1 << 22, block_size=4, max_num_seqs=2)
    replies = []
    executor = llm.engine.executor
    send = executor.execute_async
    executor.execute_async = lambda msg: (f := send(msg)).add_done_callback(lambda f: replies.append(f.result())) or f
    with profile_phases(llm.engine) as prof:
        llm.generate([{"prompt_token_ids": [5, 6, 7]}], SamplingParams(temperature=0.0, max_tokens=3),
                     use_tqdm=False)
    timed = [r.phases for r in replies if r.token_ids]
    assert len(timed) == 3 and all(set(p.seconds) == {"input preparation", "forward", "sampling"} for p in timed)
    assert all(s > 0 for p in timed for s in p.seconds.values())
    assert not any(p.device_seconds for p in timed)  # CPU: no CUDA events
    assert pickle.loads(pickle.dumps(replies[0])).phases == replies[0].phases
    assert prof.seconds["forward"] == pytest.approx(sum(p.seconds["forward"] for p in timed))
    assert prof.device_timed == []


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
    # the step total is measured by the engine (the KV recorder observes the same steps)
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
    with profile_phases(llm.engine) as prof:
        llm.generate(prompts, params, use_tqdm=False)
    assert prof.device_timed == ["forward", "sampling"]
    assert prof.seconds["forward"] > 0 and prof.seconds["sampling"] > 0
    assert set(prof.host_seconds) == {"forward", "sampling"}
    assert "GPU time" in prof.to_markdown()


def test_profile_of_a_multi_process_engine_carries_the_last_stages_phases(checkpoint_factory):
    """Pipeline parallelism on CPU (gloo): the sampling stage runs in another process; its timings
    come back in its reply."""
    from orcinus.config import EngineConfig
    from orcinus.engine.llm_engine import LLMEngine

    folder, _ = checkpoint_factory("llama")
    engine = LLMEngine(EngineConfig(model=folder, skip_tokenizer_init=True, dtype="float32", kv_cache_memory=1 << 22,
                                    block_size=4, max_num_seqs=2, pipeline_parallel_size=2))
    try:
        for i, p in enumerate([[5, 6, 7], [8, 9], [10, 11, 12, 13]]):
            engine.add_request(f"r{i}", {"prompt_token_ids": p}, SamplingParams(temperature=0.0, max_tokens=3,
                                                                                ignore_eos=True))
        with profile_phases(engine) as prof:
            while engine.has_unfinished_requests():
                engine.step()
    finally:
        engine.shutdown()
    assert prof.iterations == engine.iterations_total > 0
    assert prof.calls["input preparation"] == prof.calls["sampling"] == prof.iterations
    assert prof.seconds["forward"] > 0 and prof.seconds["sampling"] > 0
