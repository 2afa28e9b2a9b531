"""Control-plane overhead per iteration: what it costs to tell the workers what to run and hear
back, without any model work. Measured end to end over the real path: the engine builds the
`BatchMessage` from a scheduled batch of running requests, it is pickled through a pipe to a
spawned worker process which applies it to its per-request state and answers with one token per
request (a `SamplerOutput`), as a tensor-parallel or pipeline worker would.

    python -m orcinus.bench.control_plane --requests 1 256
"""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection

from orcinus.core.kv_cache import KVCacheManager
from orcinus.core.scheduler import ScheduledBatch
from orcinus.engine.batch_messages import MessageBuilder
from orcinus.request import Request
from orcinus.sampling_params import SamplingParams


@dataclass
class ControlPlaneResult:
    num_requests: int
    build_us: float  # engine: scheduler decision -> BatchMessage (median)
    round_trip_us: float  # pipe to a worker process, state update there, reply back (median)
    message_bytes: int  # pickled size of one increment-iteration message

    @property
    def total_us(self) -> float:
        return self.build_us + self.round_trip_us


def _echo_worker(conn: Connection) -> None:
    import torch

    from orcinus.executor.request_state import RequestStates
    from orcinus.executor.messages import SamplerOutput

    states = RequestStates(torch.device("cpu"))
    while True:
        msg = conn.recv()
        if msg is None:
            return
        rows, _ = states.apply(msg)
        n = len(rows)
        conn.send(SamplerOutput([1] * n, [-0.5] * n, [None] * n))


def measure(num_requests: int, iterations: int = 300) -> ControlPlaneResult:
    import pickle

    import torch.multiprocessing as mp

    prompt_len, block_size = 64, 16
    kv = KVCacheManager(num_requests * (-(-(prompt_len + iterations + 2) // block_size)), block_size)
    builder = MessageBuilder(kv)
    reqs = []
    for i in range(num_requests):
        r = Request(f"req-{i}", list(range(prompt_len)), SamplingParams(max_tokens=iterations + 2),
                    max_new_tokens=iterations + 2)
        kv.allocate(r.request_id, r.max_tokens)
        reqs.append(r)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_echo_worker, args=(child,), daemon=True)
    proc.start()
    build, trip = [], []
    size = 0
    try:
        first = builder.build(ScheduledBatch(0, reqs, [prompt_len] * num_requests))
        parent.send(first)
        parent.recv()
        for it in range(1, iterations + 1):
            for r in reqs:
                r.output_token_ids.append(1)
            t0 = time.perf_counter()
            msg = builder.build(ScheduledBatch(it, reqs, [1] * num_requests))
            t1 = time.perf_counter()
            parent.send(msg)
            parent.recv()
            t2 = time.perf_counter()
            build.append(t1 - t0)
            trip.append(t2 - t1)
        size = len(pickle.dumps(msg))
    finally:
        parent.send(None)
        proc.join(5)
        if proc.is_alive():
            proc.kill()
    return ControlPlaneResult(num_requests, statistics.median(build) * 1e6, statistics.median(trip) * 1e6, size)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, nargs="+", default=[1, 256], help="requests per batch")
    p.add_argument("--iterations", type=int, default=300)
    args = p.parse_args(argv)
    print("| requests in batch | build message (us) | pipe + worker state + reply (us) | total (us) | message bytes |")
    print("|---|---|---|---|---|")
    for n in args.requests:
        r = measure(n, args.iterations)
        print(f"| {n} | {r.build_us:.1f} | {r.round_trip_us:.1f} | {r.total_us:.1f} | {r.message_bytes} |")


if __name__ == "__main__":
    main()
