"""`bench offline --profile`'s phase timer: every phase is entered once per iteration, nothing is
counted twice, and the engine's methods are restored afterwards."""
from __future__ import annotations

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
