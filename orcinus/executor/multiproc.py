"""An executor whose workers are processes it spawns itself (torch.multiprocessing, spawn): one
per rank, tensor_parallel_size x pipeline_parallel_size of them.

Control: the engine's message goes over a pipe to each rank of the first pipeline stage, and each
stage forwards it to the next over a pipe before running its layers (Orca's Figure 7); only
hidden states and all-reduces travel over torch.distributed. Every rank answers every message over
its own pipe; a reader thread resolves the futures in order. A batch that failed on some rank is
rolled back on the ranks where it succeeded, so the engine may retry its rows. A worker that dies
fails every batch in flight within `poll_s`, and the executor then stops the other workers: none
is left behind."""
from __future__ import annotations

import atexit
import contextlib
import dataclasses
import itertools
import sys
import logging
import select
import socket
import threading
import weakref
from collections import deque
from concurrent.futures import Future
from multiprocessing.connection import Connection, wait
from multiprocessing.reduction import ForkingPickler

from orcinus.config import EngineConfig
from orcinus.distributed.worker_process import Failed, RankInfo, Ready, worker_main
from orcinus.executor.executor import Executor, WorkerDied
from orcinus.executor.messages import BatchMessage, Rollback
from orcinus.sampler import SamplerOutput

logger = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MultiprocExecutor(Executor):
    poll_s = 0.2

    def __init__(self, config: EngineConfig, start_timeout_s: float = 600.0,
                 collective_timeout_s: float = 120.0) -> None:
        import torch.multiprocessing as mp

        from orcinus.models.loader import check_tensor_parallel, inspect_model

        tp, pp = config.tensor_parallel_size, config.pipeline_parallel_size
        check_tensor_parallel(*inspect_model(config.model), tp, pp)
        self.tp, self.pp = tp, pp
        self.world_size = tp * pp
        ctx = mp.get_context("spawn")
        port = free_port()
        self._conns: list[Connection] = []
        self._procs = []
        self._pending: deque[tuple[int, Future[SamplerOutput]]] = deque()
        self._seq = itertools.count(1)
        # (stage, seq, started, finished) of recent messages on tensor-parallel rank 0 of each stage
        self.stage_timings: deque[tuple[int, int, float, float]] = deque(maxlen=10_000)
        self._lock = threading.Lock()
        self._dead: str | None = None
        self._closed = False
        # control pipes from each rank to the same tensor-parallel rank of the next stage
        links = {rank: ctx.Pipe(duplex=False) for rank in range(self.world_size - tp)}
        for rank in range(self.world_size):
            parent, child = ctx.Pipe()
            info = RankInfo(rank, tp, pp, "127.0.0.1", port, timeout_s=collective_timeout_s)
            prev_conn = links[rank - tp][0] if rank >= tp else None
            next_conn = links[rank][1] if rank in links else None
            proc = ctx.Process(target=worker_main, args=(info, config, child, prev_conn, next_conn), daemon=True,
                               name=f"orcinus-pp{info.stage}-tp{info.tp_rank}")
            with _main_module_hidden():
                proc.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(proc)
        for recv_end, send_end in links.values():  # the workers hold them now
            recv_end.close()
            send_end.close()
        self._finalizer = weakref.finalize(self, _stop, self._conns, self._procs)
        atexit.register(self._finalizer)
        try:
            ready = [self._first_reply(rank, start_timeout_s) for rank in range(self.world_size)]
        except BaseException:
            self.shutdown()
            raise
        self.model_config = ready[0].model_config
        self.model_path = ready[0].model_path
        self.num_blocks = min(r.num_blocks for r in ready)  # every rank must hold the whole pool
        for conn in self._conns:
            conn.send(self.num_blocks)
        self._reader = threading.Thread(target=self._read_replies, name="orcinus-executor-reader", daemon=True)
        self._reader.start()
        logger.info("%d worker processes (tensor_parallel_size=%d x pipeline_parallel_size=%d, pids %s), "
                    "%d KV blocks each", self.world_size, tp, pp, [r.pid for r in ready], self.num_blocks)

    def _first_reply(self, rank: int, timeout_s: float) -> Ready:
        conn, proc = self._conns[rank], self._procs[rank]
        if not wait([conn, proc.sentinel], timeout_s):
            raise WorkerDied(f"worker {rank} did not start within {timeout_s:.0f} s")
        if not conn.poll():
            proc.join(1.0)
            raise WorkerDied(f"worker {rank} exited during start-up (exit code {proc.exitcode})")
        reply = conn.recv()
        if isinstance(reply, Failed):
            raise reply.to_exception()
        return reply

    # ------------------------------------------------------------------ iterations
    def execute_async(self, msg: BatchMessage) -> "Future[SamplerOutput]":
        fut: Future[SamplerOutput] = Future()
        msg = dataclasses.replace(msg, seq=next(self._seq))
        with self._lock:
            if self._dead is not None:
                fut.set_exception(WorkerDied(self._dead))
                return fut
            self._pending.append((msg.seq, fut))
            self._send_to_first_stage(msg)
        return fut

    def _send_to_first_stage(self, item: object) -> None:
        try:
            raw = bytes(ForkingPickler.dumps(item))  # encoded once for all the first stage's ranks
            for conn in self._conns[:self.tp]:
                conn.send_bytes(raw)
        except (OSError, ValueError) as exc:
            threading.Thread(target=self._die, args=(f"could not reach a worker process: {exc}",)).start()

    def _read_replies(self) -> None:
        """Resolve futures in order: one reply per rank per message; watch for dead workers."""
        sentinels = [p.sentinel for p in self._procs]
        while True:
            with self._lock:
                if self._dead is not None or self._closed:
                    return
                head = self._pending[0] if self._pending else None
            if head is None:
                if wait(sentinels, self.poll_s):
                    self._die(self._death_note())
                continue
            seq, fut = head
            replies: list[object] = []
            for rank, conn in enumerate(self._conns):
                while not conn.poll():
                    if wait([conn, self._procs[rank].sentinel], self.poll_s) and not conn.poll():
                        self._die(self._death_note())
                        return
                    with self._lock:
                        if self._closed:
                            return
                try:
                    replies.append(conn.recv())
                except (EOFError, OSError):
                    self._die(self._death_note())
                    return
            with self._lock:
                self._pending.popleft()
            self._settle(seq, fut, replies)

    def _settle(self, seq: int, fut: Future, replies: list[object]) -> None:
        errors = [r for r in replies if isinstance(r, Failed)]
        if not errors:
            for rank in range(0, self.world_size, self.tp):
                r = replies[rank]
                self.stage_timings.append((r.stage, seq, r.started, r.finished))
            fut.set_result(replies[self.world_size - self.tp].output)
            return
        if len(errors) < len(replies):
            # It succeeded on some ranks (earlier stages, say): undo it there before anyone retries.
            with self._lock:
                self._send_to_first_stage(Rollback(seq))
        cause = next((e for e in errors if e.kind != "UpstreamFailed"), errors[0])
        fut.set_exception(cause.to_exception())

    def _death_note(self) -> str:
        # A sentinel fires as the process ends; give the exit status a moment to be collected.
        wait([p.sentinel for p in self._procs], 1.0)
        for rank, proc in enumerate(self._procs):
            if wait([proc.sentinel], 0):
                proc.join(1.0)
            if proc.exitcode is not None:
                return (f"worker {rank} (pid {proc.pid}) died with exit code {proc.exitcode}; "
                        "the engine cannot run iterations any more")
        return "a worker stopped answering; the engine cannot run iterations any more"

    def _die(self, reason: str) -> None:
        with self._lock:
            if self._dead is None:
                self._dead = reason
                logger.error(reason)
            pending, self._pending = [f for _, f in self._pending], deque()
        # The survivors may be stuck in a collective with the dead rank: stop them all now, before
        # anyone hears of the failure (so that no process outlives the error).
        _stop(self._conns, self._procs, grace_s=0.0)
        for fut in pending:
            if not fut.done():
                fut.set_exception(WorkerDied(reason))

    def shutdown(self) -> None:
        with self._lock:
            self._closed = True
            if self._dead is None:
                self._dead = "the executor was shut down"
        self._finalizer()


@contextlib.contextmanager
def _main_module_hidden():
    """Spawned workers run only orcinus code, so they need not re-run the user's script: hiding
    its path while a worker starts spares users the `if __name__ == "__main__":` guard (without
    it, the script would start its own engine in every worker)."""
    main = sys.modules.get("__main__")
    if main is None:
        yield
        return
    saved_file, saved_spec = getattr(main, "__file__", None), getattr(main, "__spec__", None)
    try:
        if hasattr(main, "__file__"):
            del main.__file__
        main.__spec__ = None
        yield
    finally:
        if saved_file is not None:
            main.__file__ = saved_file
        main.__spec__ = saved_spec


def _stop(conns: list[Connection], procs: list, grace_s: float = 2.0) -> None:
    """Ask every worker to exit, then terminate and finally kill those that do not."""
    for conn, proc in zip(conns, procs):
        try:
            # Only when the pipe takes it at once: a stuck worker with a full pipe must not block us.
            if proc.is_alive() and select.select([], [conn.fileno()], [], 0)[1]:
                conn.send(None)
        except Exception:
            pass
    for proc in procs:
        proc.join(grace_s)
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
            proc.join(2.0)
        if proc.is_alive():
            proc.kill()
            proc.join()
    for conn in conns:
        try:
            conn.close()
        except Exception:
            pass
