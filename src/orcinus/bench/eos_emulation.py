"""Requests whose length the server does not know: each asks for no `max_tokens` (up to the
context length, as a chat client that sets none) and ends when it has produced its trace length,
as if the model had emitted EOS there. The engine learns the end only when it happens, which is
the case the vLLM paper measured Orca in ("Orca (Max)"): Orca must reserve the whole context."""
from __future__ import annotations

from typing import Sequence

from orcinus.bench.workloads import BenchRequest


def generate_until_trace_lengths(engine, trace: Sequence[BenchRequest]) -> list[int]:
    """Runs the trace on an idle LLMEngine; returns each request's number of output tokens."""
    from orcinus.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True)
    want = {}
    for i, r in enumerate(trace):
        rid = f"until-{i}"
        engine.add_request(rid, {"prompt_token_ids": r.prompt_token_ids}, params)
        want[rid] = (i, r.output_len)
    got = [0] * len(trace)
    while engine.has_unfinished_requests():
        for out in engine.step():
            i, n = want[out.request_id]
            got[i] = len(out.outputs[0].token_ids)
            if got[i] >= n and not out.finished:
                engine.abort_request(out.request_id)  # "EOS": the end the scheduler could not foresee
    return got
