"""The body of one spawned worker process: join the tensor-parallel group, build this rank's
shard of the model, report how many KV blocks it can hold, then serve batch messages.

Control travels over a multiprocessing pipe (pickled plain data, CPU only); only activations go
over the torch.distributed group (gloo on CPU, NCCL on CUDA)."""
from __future__ import annotations

import dataclasses
import datetime
import logging
import os
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler

from orcinus.config import EngineConfig
from orcinus.executor.messages import Failed, Ready, Reply  # noqa: F401  (re-exported)

logger = logging.getLogger(__name__)


@dataclass
class RankInfo:
    rank: int  # global: stage * tensor_parallel_size + tensor-parallel rank
    tensor_parallel_size: int
    pipeline_parallel_size: int
    master_addr: str
    master_port: int
    timeout_s: float
    networked: bool = False  # several machines: connect to the engine and the neighbours over TCP

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tensor_parallel_size

    @property
    def stage(self) -> int:
        return self.rank // self.tensor_parallel_size


def worker_main(info: RankInfo, config: EngineConfig, conn: Connection | None = None,
                prev_conn: Connection | None = None, next_conn: Connection | None = None) -> None:
    """`conn`: this rank's pipe to the executor (start-up, replies; messages too on stage 0).
    `prev_conn` / `next_conn`: control pipes from the previous / to the next pipeline stage.
    With `info.networked` the rank makes these connections itself (see network.py)."""
    import time

    import torch
    import torch.distributed as dist

    from orcinus.distributed.parallel_state import PipelineStage, set_pipeline_stage, set_tensor_parallel
    from orcinus.executor.messages import Rollback
    from orcinus.executor.platform import resolve_device
    from orcinus.executor.worker import Worker

    tp, pp = info.tensor_parallel_size, info.pipeline_parallel_size
    if info.networked:
        from orcinus.distributed.network import connect_rank

        conn, prev_conn, next_conn = connect_rank(info.rank, tp, pp, info.master_addr, info.master_port,
                                                  info.timeout_s)
    try:
        device = resolve_device(config)
        if device.type == "cuda":  # a GPU of its own (the Worker sets it as this thread's device)
            from orcinus.executor.cuda_memory import rank_device

            per_node = max(1, info.world_size // config.nnodes)
            device = rank_device(device, info.rank % per_node, per_node, torch.cuda.device_count())
            torch.cuda.set_device(device)
            config = dataclasses.replace(config, device=str(device))
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            init_method=f"tcp://{info.master_addr}:{info.master_port}",
            rank=info.rank, world_size=info.world_size,
            timeout=datetime.timedelta(seconds=info.timeout_s),
        )
        group = dist.group.WORLD
        if pp > 1:  # every rank creates every stage's group, in the same order
            groups = [dist.new_group(list(range(s * tp, (s + 1) * tp))) for s in range(pp)]
            group = groups[info.stage] if tp > 1 else None
        set_tensor_parallel(info.tp_rank, tp, group)
        set_pipeline_stage(PipelineStage(info.stage, pp, info.rank - tp if info.stage > 0 else None,
                                         info.rank + tp if info.stage < pp - 1 else None))
        worker = Worker(config)
        conn.send(Ready(worker.ready_info(), os.getpid()))
        worker.initialize_kv_cache(conn.recv())
    except BaseException as exc:
        _send_quietly(conn, Failed.of(exc))
        return
    inbox = conn if prev_conn is None else prev_conn
    try:
        while True:
            try:
                raw = inbox.recv_bytes()
            except EOFError:  # the engine (or the previous stage) is gone: nothing left to serve
                return
            if next_conn is not None:
                # Orca's Figure 7: pass the control message on (still encoded) before launching this
                # stage's kernels, so the next stage is ready as soon as the hidden states come.
                next_conn.send_bytes(raw)
            item = ForkingPickler.loads(raw)
            if item is None:
                return
            if isinstance(item, Rollback):
                worker.rollback(item.seq)
                continue
            started = time.monotonic()
            try:
                out = worker.execute(item)
            except Exception as exc:
                conn.send(Failed.of(exc))
                continue
            # Every tensor-parallel rank sampled the same tokens from the same gathered logits.
            conn.send(Reply(out if info.tp_rank == 0 else None, info.stage, item.seq, started, time.monotonic()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _send_quietly(conn: Connection, item: object) -> None:
    try:
        conn.send(item)
    except Exception:
        pass
