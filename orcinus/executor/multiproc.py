"""An executor whose workers are processes it spawns itself (torch.multiprocessing, spawn): one
per tensor-parallel rank. Every rank receives every batch message over its own pipe; replies come
back in order and a reader thread resolves the futures. A worker that dies fails every batch in
flight within `poll_s`, and the executor then stops the other workers: none is left behind."""
from __future__ import annotations

import atexit
import contextlib
import sys
import logging
import select
import socket
import threading
import weakref
from collections import deque
from concurrent.futures import Future
from multiprocessing.connection import Connection, wait

from orcinus.config import EngineConfig
from orcinus.distributed.worker_process import Failed, RankInfo, Ready, worker_main
from orcinus.executor.executor import Executor, WorkerDied
from orcinus.executor.messages import BatchMessage
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

        check_tensor_parallel(*inspect_model(config.model), config.tensor_parallel_size)
        self.world_size = config.tensor_parallel_size
        ctx = mp.get_context("spawn")
        port = free_port()
        self._conns: list[Connection] = []
        self._procs = []
        self._pending: deque[Future[SamplerOutput]] = deque()
        self._lock = threading.Lock()
        self._dead: str | None = None
        self._closed = False
        for rank in range(self.world_size):
            parent, child = ctx.Pipe()
            info = RankInfo(rank, self.world_size, "127.0.0.1", port, timeout_s=collective_timeout_s)
            proc = ctx.Process(target=worker_main, args=(info, config, child), daemon=True,
                               name=f"orcinus-tp{rank}")
            with _main_module_hidden():
                proc.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(proc)
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
        logger.info("tensor parallel: %d worker processes (pids %s), %d KV blocks each",
                    self.world_size, [r.pid for r in ready], self.num_blocks)

    def _first_reply(self, rank: int, timeout_s: float) -> Ready:
        conn, proc = self._conns[rank], self._procs[rank]
        if not wait([conn, proc.sentinel], timeout_s):
            raise WorkerDied(f"tensor-parallel worker {rank} did not start within {timeout_s:.0f} s")
        if not conn.poll():
            proc.join(1.0)
            raise WorkerDied(f"tensor-parallel worker {rank} exited during start-up (exit code {proc.exitcode})")
        reply = conn.recv()
        if isinstance(reply, Failed):
            raise reply.to_exception()
        return reply

    # ------------------------------------------------------------------ iterations
    def execute_async(self, msg: BatchMessage) -> "Future[SamplerOutput]":
        fut: Future[SamplerOutput] = Future()
        with self._lock:
            if self._dead is not None:
                fut.set_exception(WorkerDied(self._dead))
                return fut
            self._pending.append(fut)
            try:
                for conn in self._conns:
                    conn.send(msg)
            except (OSError, ValueError) as exc:
                self._die(f"could not reach a worker process: {exc}")
        return fut

    def _read_replies(self) -> None:
        """Resolve futures in order: one reply per rank per message; watch for dead workers."""
        sentinels = [p.sentinel for p in self._procs]
        while True:
            with self._lock:
                if self._dead is not None or self._closed:
                    return
                fut = self._pending[0] if self._pending else None
            if fut is None:
                ready = wait(sentinels, self.poll_s)
                if ready:
                    self._die(self._death_note())
                continue
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
            errors = [r for r in replies if isinstance(r, Failed)]
            if errors and len(errors) < len(replies):
                # Some ranks committed the iteration and some rolled it back: their states differ.
                self._die(f"tensor-parallel ranks disagreed on an iteration ({errors[0].kind}: "
                          f"{errors[0].message}); the engine cannot run iterations any more")
                fut.set_exception(WorkerDied(self._dead or "workers disagreed"))
                return
            if errors:
                fut.set_exception(errors[0].to_exception())
            else:
                fut.set_result(replies[0])

    def _death_note(self) -> str:
        # A sentinel fires as the process ends; give the exit status a moment to be collected.
        wait([p.sentinel for p in self._procs], 1.0)
        for rank, proc in enumerate(self._procs):
            if wait([proc.sentinel], 0):
                proc.join(1.0)
            if proc.exitcode is not None:
                return (f"tensor-parallel worker {rank} (pid {proc.pid}) died with exit code {proc.exitcode}; "
                        "the engine cannot run iterations any more")
        return "a tensor-parallel worker stopped answering; the engine cannot run iterations any more"

    def _die(self, reason: str) -> None:
        with self._lock:
            if self._dead is None:
                self._dead = reason
                logger.error(reason)
            pending, self._pending = list(self._pending), deque()
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
