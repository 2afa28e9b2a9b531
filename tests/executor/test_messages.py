"""The engine-to-worker contract: plain picklable messages, a request sent in full once, then only
its newest token and new blocks, and its state dropped by workers once it is gone."""
from __future__ import annotations

import pickle

import torch

from orcinus.core.kv_cache import KVCacheManager
from orcinus.core.scheduler import ScheduledBatch
from orcinus.engine.batch_messages import MessageBuilder
from orcinus.engine.llm_engine import LLMEngine
from orcinus.executor.messages import BatchMessage, CachedRequestData, NewRequestData, SamplingSettings
from orcinus.request import Request
from orcinus.sampling_params import SamplingParams

GREEDY = dict(temperature=0.0, ignore_eos=True)


def _plain(obj) -> bool:
    """Only ids, numbers, strings, lists/tuples and the contract's dataclasses: nothing live."""
    if obj is None or isinstance(obj, (int, float, str, bool)):
        return True
    if isinstance(obj, (list, tuple)):
        return all(_plain(x) for x in obj)
    if isinstance(obj, (BatchMessage, NewRequestData, CachedRequestData, SamplingSettings)):
        return all(_plain(v) for v in vars(obj).values())
    return False


def _recording_engine(folder: str) -> tuple[LLMEngine, list[BatchMessage]]:
    engine = LLMEngine.from_kwargs(model=folder, skip_tokenizer_init=True, dtype="float32",
                                   kv_cache_memory=1 << 22, block_size=4, scheduler_policy="orca")
    sent: list[BatchMessage] = []
    # Recorded where the engine launches (its thread, in launch order), not where the worker runs.
    original = engine.executor.execute_async
    engine.executor.execute_async = lambda msg: sent.append(pickle.loads(pickle.dumps(msg))) or original(msg)
    return engine, sent


def test_request_is_sent_in_full_once_then_as_its_new_token(checkpoint_factory):
    folder, _ = checkpoint_factory("llama")
    engine, sent = _recording_engine(folder)
    engine.add_request("a", {"prompt_token_ids": [5, 6, 7, 8, 9]},
                       SamplingParams(max_tokens=4, seed=3, temperature=0.7, min_tokens=2, stop_token_ids=[11]))
    tokens: list[int] = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens = out.outputs[0].token_ids
    assert all(_plain(m) for m in sent)
    first, *later, flush = sent
    (new,) = first.requests
    assert isinstance(new, NewRequestData) and new.prompt_token_ids == [5, 6, 7, 8, 9]
    assert new.settings.seed == 3 and new.settings.min_tokens == 2 and new.settings.temperature == 0.7
    assert set(new.settings.stop_token_ids) == {2, 11}  # the model's EOS and the request's stop id
    assert len(new.block_ids) == 3  # 5 + 4 tokens, worst case reserved up front, 4 per block
    # Afterwards only the token sampled in the previous iteration; no block was added.
    assert [m.requests for m in later] == [[CachedRequestData("a", t, [])] for t in tokens[:-1]]
    # Idle now: the workers are told at once to forget the finished request.
    assert flush.requests == [] and flush.finished_ids == ["a"]
    assert len(engine.executor.driver_worker.states) == 0


def test_finished_ids_reach_workers_which_drop_their_state(checkpoint_factory):
    folder, _ = checkpoint_factory("llama")
    engine, sent = _recording_engine(folder)
    states = engine.executor.driver_worker.states
    engine.add_request("short", {"prompt_token_ids": [5, 6]}, SamplingParams(max_tokens=1, **GREEDY))
    engine.add_request("long", {"prompt_token_ids": [7, 8]}, SamplingParams(max_tokens=5, **GREEDY))
    engine.step()  # iteration 1 ran both and "short" is done; iteration 2 is launched with "long" only
    first, second = sent
    assert [(type(r), r.request_id) for r in first.requests] == [(NewRequestData, "short"), (NewRequestData, "long")]
    assert second.finished_ids == ["short"] and [r.request_id for r in second.requests] == ["long"]
    engine.step()  # iteration 2 has run on the worker, which applied its finished ids first
    assert "short" not in states and "long" in states
    engine.add_request("short", {"prompt_token_ids": [9]}, SamplingParams(max_tokens=1, **GREEDY))  # id reused
    engine.abort_request("long")  # in flight in iteration 3: its token is discarded when it returns
    while engine.has_unfinished_requests():
        engine.step()
    later = sent[2:]
    # "long" is dropped once, "short" comes back as a new request with its new prompt, and in the
    # end every id has been dropped by the worker.
    assert sum(m.finished_ids.count("long") for m in later) == 1
    reused = [r for m in later for r in m.requests if r.request_id == "short"]
    assert isinstance(reused[0], NewRequestData) and reused[0].prompt_token_ids == [9]
    assert len(states) == 0 and engine.free_all_check()



def test_blocks_added_since_last_message_are_sent_alone():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    builder = MessageBuilder(kv)
    req = Request("r", [1, 2, 3], SamplingParams(max_tokens=2), max_new_tokens=2)
    kv.allocate("r", 4)
    (new,) = builder.build(ScheduledBatch(0, [req], [3])).requests
    assert new.block_ids == kv.block_table("r")[:1]
    req.num_computed_tokens = 3  # as the engine records when the batch returns
    req.output_token_ids.append(42)
    kv.allocate("r", 9)  # grew by two blocks
    (cached,) = builder.build(ScheduledBatch(1, [req], [1])).requests
    assert cached == CachedRequestData("r", 42, kv.block_table("r")[1:3])
    builder.forget("r")
    assert builder.build(ScheduledBatch(2, [], [])).finished_ids == ["r"]
