"""CUDA graphs and the one-copy upload on a GPU (the gpu tier: skipped without CUDA, see
tests/conftest.py). The CPU half of this feature is in test_cuda_graphs.py and
test_host_staging.py; these add what only a GPU shows: capture, replay against the eager
forward, the end-to-end tokens with and without enforce_eager, and no host synchronisation in
the forward pass."""
from __future__ import annotations

import pytest
import torch

from orcinus.config import EngineConfig
from orcinus.executor.messages import BatchMessage, CachedRequestData, NewRequestData, SamplingSettings
from orcinus.executor.worker import Worker
from orcinus.sampling_params import SamplingParams

pytestmark = pytest.mark.gpu

GREEDY = SamplingSettings(temperature=0.0)


def _worker(folder: str, backend: str = "triton", **kw) -> Worker:
    if backend == "triton":
        pytest.importorskip("triton", reason="CUDA graphs capture the Triton backend; install triton")
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32 here
    worker = Worker(EngineConfig(model=folder, dtype="float32", device="cuda", kv_cache_memory=1 << 22, block_size=8,
                                 attention_backend=backend, max_num_seqs=8, **kw))
    worker.initialize_kv_cache(worker.available_kv_blocks())  # captures the graphs
    return worker


class _Ids:
    """Request ids and block ids that never collide within one worker."""

    def __init__(self) -> None:
        self.request = 0
        self.block = 0

    def new(self, prompt: list[int], extra_tokens: int = 8) -> NewRequestData:
        n = -(-(len(prompt) + extra_tokens) // 8)
        data = NewRequestData(f"r{self.request}", prompt, GREEDY, list(range(self.block, self.block + n)))
        self.request += 1
        self.block += n
        return data


def _decode_message(worker: Worker, ids: _Ids, n: int, seq: int) -> BatchMessage:
    g = torch.Generator().manual_seed(n)
    news = [ids.new(torch.randint(3, 300, (int(k),), generator=g).tolist())
            for k in torch.randint(2, 30, (n,), generator=g)]
    tokens = worker.execute(BatchMessage(seq, news)).token_ids
    return BatchMessage(seq + 1, [CachedRequestData(r.request_id, t) for r, t in zip(news, tokens)])


def test_graphs_are_captured_for_every_planned_size(checkpoint_factory):
    folder, _ = checkpoint_factory("llama")
    runner = _worker(folder).runner
    assert runner.graph_plan.enabled and runner.graph_plan.sizes == [1, 2, 4, 8]
    assert sorted(runner.graphs.graphs) == [1, 2, 4, 8]
    assert runner.kv_caches[0][0].shape[0] == runner.num_blocks + 1  # the padding block
    assert not _worker(folder, enforce_eager=True).runner.graphs


@pytest.mark.parametrize("arch", ["llama", "mistral", "gpt2"])
def test_replayed_logits_equal_eager_logits_for_exact_and_padded_sizes(arch, checkpoint_factory):
    folder, _ = checkpoint_factory(arch)
    worker = _worker(folder)
    runner, ids = worker.runner, _Ids()
    replays = []
    original = runner.graphs.replay
    runner.graphs.replay = lambda padded: replays.append(padded) or original(padded)
    for seq, n in enumerate((1, 3, 4, 7, 8)):
        msg = _decode_message(worker, ids, n, 10 * seq)
        rows, undo = worker.states.apply(msg)
        before = [(k.clone(), v.clone()) for k, v in runner.kv_caches]
        graphs, runner.graphs = runner.graphs, None
        eager = runner.forward_logits(runner.prepare(rows)).cpu()
        kv_eager = [(k[:-1].clone(), v[:-1].clone()) for k, v in runner.kv_caches]
        for (k, v), (k0, v0) in zip(runner.kv_caches, before):
            k.copy_(k0)
            v.copy_(v0)
        runner.graphs = graphs
        inp = runner.prepare(rows)
        replayed = runner.forward_logits(inp).cpu()
        assert inp.padded == {1: 1, 3: 4, 4: 4, 7: 8, 8: 8}[n] and replays[-1] == inp.padded
        assert replayed.shape == eager.shape == (n, worker.model_config.vocab_size)
        torch.testing.assert_close(replayed, eager, rtol=1e-4, atol=1e-4)
        for (k, v), (ke, ve) in zip(runner.kv_caches, kv_eager):  # the engine's blocks: as eager wrote them
            torch.testing.assert_close(k[:-1], ke, rtol=1e-4, atol=1e-4, equal_nan=True)
            torch.testing.assert_close(v[:-1], ve, rtol=1e-4, atol=1e-4, equal_nan=True)
        worker.states.rollback(undo)
    assert len(replays) == 5


def test_mixed_and_oversized_batches_run_eagerly(checkpoint_factory):
    folder, _ = checkpoint_factory("llama")
    worker = _worker(folder)
    ids = _Ids()
    msg = _decode_message(worker, ids, 8, 0)
    mixed = BatchMessage(5, [msg.requests[0], ids.new([4, 5, 6])])  # selective batching: eager
    rows, undo = worker.states.apply(mixed)
    assert worker.runner.prepare(rows).padded is None
    worker.states.rollback(undo)
    oversized = _decode_message(worker, ids, 9, 10)  # more increments than the largest graph
    rows, undo = worker.states.apply(oversized)
    inp = worker.runner.prepare(rows)
    assert inp.padded is None and worker.runner.forward_logits(inp).shape[0] == 9
    worker.states.rollback(undo)


def test_greedy_output_is_identical_with_and_without_enforce_eager(checkpoint_factory):
    pytest.importorskip("triton", reason="CUDA graphs capture the Triton backend; install triton")
    from orcinus.engine.llm_engine import LLMEngine

    torch.backends.cuda.matmul.allow_tf32 = False
    folder, _ = checkpoint_factory("qwen3")
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (5, 37, 12, 1, 20, 9)]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    outputs, replays = {}, {}
    for eager in (True, False):
        engine = LLMEngine.from_kwargs(model=folder, skip_tokenizer_init=True, dtype="float32", device="cuda",
                                       kv_cache_memory=1 << 22, block_size=8, max_num_seqs=8, enforce_eager=eager)
        runner = engine.executor.driver_worker.runner
        count = []
        if runner.graphs is not None:
            original = runner.graphs.replay
            runner.graphs.replay = lambda padded: count.append(padded) or original(padded)
        for i, p in enumerate(prompts):
            engine.add_request(f"r{i}", {"prompt_token_ids": p}, params)
        done = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out.outputs[0].token_ids
        outputs[eager], replays[eager] = done, count
    assert replays[True] == [] and len(replays[False]) > 0  # prompts ran eagerly, the increments replayed
    assert outputs[False] == outputs[True]


@pytest.mark.parametrize("backend", ["triton", "batched", "reference"])
def test_the_forward_pass_never_synchronises_the_host(backend, checkpoint_factory):
    folder, _ = checkpoint_factory("mistral")  # GQA, sliding window
    worker = _worker(folder, backend)
    runner, ids = worker.runner, _Ids()
    msg = _decode_message(worker, ids, 3, 0)
    mixed = BatchMessage(1, [*msg.requests, ids.new(list(range(3, 40)))])
    batches = [mixed] + ([msg] if runner.graphs is not None else [])  # eager, then a graph replay
    for batch in batches:
        rows, undo = worker.states.apply(batch)
        torch.cuda.synchronize()
        copies = runner.upload.copies
        torch.cuda.set_sync_debug_mode("error")
        try:
            inp = runner.prepare(rows)
            logits = runner.forward_logits(inp)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert runner.upload.copies == copies + (1 if inp.padded is None else 0)  # one copy per eager iteration
        assert logits.shape[0] == len(rows) and torch.isfinite(logits).all()
        worker.states.rollback(undo)
