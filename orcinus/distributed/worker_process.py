"""The body of one spawned worker process: join the tensor-parallel group, build this rank's
shard of the model, report how many KV blocks it can hold, then serve batch messages.

Control travels over a multiprocessing pipe (pickled plain data, CPU only); only activations go
over the torch.distributed group (gloo on CPU, NCCL on CUDA)."""
from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import pickle
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection

from orcinus.config import EngineConfig

logger = logging.getLogger(__name__)


@dataclass
class RankInfo:
    rank: int
    world_size: int
    master_addr: str
    master_port: int
    timeout_s: float


@dataclass
class Ready:
    """First reply of a worker: what the executor needs to size the pool and describe the model."""

    num_blocks: int
    model_config: object
    model_path: str
    pid: int


@dataclass
class Failed:
    """An error on a worker, as text plus the exception when it pickles."""

    kind: str
    message: str
    detail: str
    exception: BaseException | None = None

    @classmethod
    def of(cls, exc: BaseException) -> "Failed":
        try:
            pickle.dumps(exc)
            carried = exc
        except Exception:
            carried = None
        return cls(type(exc).__name__, str(exc), traceback.format_exc(), carried)

    def to_exception(self) -> BaseException:
        return self.exception if self.exception is not None else RuntimeError(f"{self.kind}: {self.message}")


def worker_main(info: RankInfo, config: EngineConfig, conn: Connection) -> None:
    import torch
    import torch.distributed as dist

    from orcinus.distributed.parallel_state import set_tensor_parallel
    from orcinus.executor.worker import Worker

    try:
        device = config.resolved_device()
        if device.type == "cuda":
            device = torch.device("cuda", info.rank)
            torch.cuda.set_device(device)
            config = dataclasses.replace(config, device=str(device))
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            init_method=f"tcp://{info.master_addr}:{info.master_port}",
            rank=info.rank, world_size=info.world_size,
            timeout=datetime.timedelta(seconds=info.timeout_s),
        )
        set_tensor_parallel(info.rank, info.world_size, dist.group.WORLD)
        worker = Worker(config)
        conn.send(Ready(worker.available_kv_blocks(), worker.model_config, worker.model_path, os.getpid()))
        worker.initialize_kv_cache(conn.recv())
    except BaseException as exc:
        _send_quietly(conn, Failed.of(exc))
        return
    try:
        while True:
            try:
                msg = conn.recv()
            except EOFError:  # the engine is gone: nothing left to serve
                return
            if msg is None:
                return
            try:
                out = worker.execute(msg)
            except Exception as exc:
                conn.send(Failed.of(exc))
                continue
            # Every rank sampled the same tokens from the same gathered logits; one copy suffices.
            conn.send(out if info.rank == 0 else None)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _send_quietly(conn: Connection, item: object) -> None:
    try:
        conn.send(item)
    except Exception:
        pass
