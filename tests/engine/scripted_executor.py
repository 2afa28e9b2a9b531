"""A stand-in for the workers: an `Executor` that returns scripted tokens without a model.

The engine's loop (scheduling, chunked prefill, preemption, aborts, failure isolation, the plain
data it sends) does not depend on what the model computes, so tests of the loop drive
`LLMEngine(config, executor=ScriptedExecutor(...))` and run in milliseconds. It keeps what a
worker keeps per request (how many tokens it has sampled; a resumed request starts again from
its `output_token_ids`) and checks the contract as a worker would: every message pickles, a cached
row names a request it holds, a new row one it does not.
"""
from __future__ import annotations

import pickle
from concurrent.futures import Future
from typing import Callable

from orcinus.config import ModelConfig
from orcinus.executor.executor import Executor
from orcinus.executor.messages import BatchMessage, CachedRequestData, NewRequestData, SamplerOutput, WorkerInfo


def default_script(request_id: str, index: int) -> int:
    """The index-th token generated for a request: depends only on the two (like a greedy model,
    whatever the batch), and never 0, which tests may use as EOS."""
    return 1 + (sum(map(ord, request_id)) + 7 * index) % 97


class ScriptedExecutor(Executor):
    def __init__(self, num_blocks: int = 64, max_position_embeddings: int = 4096,
                 script: Callable[[str, int], int] = default_script,
                 fail: Callable[[BatchMessage], BaseException | None] | None = None) -> None:
        config = ModelConfig("llama", vocab_size=100, hidden_size=8, num_layers=1, num_heads=1,
                             num_kv_heads=1, head_dim=8, intermediate_size=8,
                             max_position_embeddings=max_position_embeddings, eos_token_ids=[0])
        self.info = WorkerInfo(num_blocks, config, "scripted", "cpu", "float32", "", "off (scripted)")
        self.num_blocks = num_blocks
        self.script = script
        self.fail = fail  # message -> the error to raise for it (None: run it)
        self.sent: list[BatchMessage] = []  # every message, as a worker would receive it
        self.generated: dict[str, int] = {}  # request id -> tokens sampled for it so far
        self.shut_down = False

    def execute_async(self, msg: BatchMessage) -> "Future[SamplerOutput]":
        fut: Future[SamplerOutput] = Future()
        msg = pickle.loads(pickle.dumps(msg))  # only plain data crosses the boundary
        self.sent.append(msg)
        try:
            fut.set_result(self._run(msg))
        except BaseException as exc:  # surfaced where the engine waits, as a worker's would be
            fut.set_exception(exc)
        return fut

    def _run(self, msg: BatchMessage) -> SamplerOutput:
        error = self.fail(msg) if self.fail is not None else None
        if error is not None:
            raise error  # a worker leaves its state as before a failed message
        for rid in msg.finished_ids + msg.preempted_ids:
            self.generated.pop(rid, None)
        for row in msg.requests:
            if isinstance(row, NewRequestData):
                assert row.request_id not in self.generated, f"{row.request_id} sent as new twice"
                self.generated[row.request_id] = len(row.output_token_ids)
            else:
                assert isinstance(row, CachedRequestData)
                assert row.request_id in self.generated, f"{row.request_id} cached but never sent"
        tokens = []
        for rid in msg.sampled_ids:
            tokens.append(self.script(rid, self.generated[rid]))
            self.generated[rid] += 1
        return SamplerOutput(tokens, [0.0] * len(tokens), [None] * len(tokens))

    def shutdown(self) -> None:
        self.shut_down = True
