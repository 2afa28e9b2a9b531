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
import os
import sys
import logging
import select
import socket
import threading
import weakref
from collections import deque
from concurrent.futures import Future
from multiprocessing.connection import Connection, Listener, wait
from multiprocessing.reduction import ForkingPickler

from orcinus.config import EngineConfig
from orcinus.errors import ConfigError
from orcinus.executor.worker_process import RankInfo, worker_main
from orcinus.errors import WorkerDied
from orcinus.executor.executor import Executor
from orcinus.executor.messages import BatchMessage, Failed, Ready, Rollback, SamplerOutput

logger = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MultiprocExecutor(Executor):
    poll_s = 0.2

    def __init__(self, config: EngineConfig, start_timeout_s: float = 600.0) -> None:
        import torch.multiprocessing as mp

        from orcinus.models.loader import check_tensor_parallel, inspect_model

        tp, pp = config.tensor_parallel_size, config.pipeline_parallel_size
        check_tensor_parallel(*inspect_model(config.model), tp, pp)
        self.tp, self.pp = tp, pp
        self.world_size = tp * pp
        ctx = mp.get_context("spawn")
        self._conns: list[Connection] = []
        self._procs: list = []  # per rank; None for ranks on other machines
        self._pending: deque[tuple[int, Future[SamplerOutput]]] = deque()
        self._seq = itertools.count(1)
        # (stage, seq, started, finished) of recent messages on tensor-parallel rank 0 of each stage
        self.stage_timings: deque[tuple[int, int, float, float]] = deque(maxlen=10_000)
        self._lock = threading.Lock()
        self._dead: str | None = None
        self._closed = False
        _check_placement(config, self.world_size)  # before any process starts
        if config.nnodes > 1:
            self._start_networked(ctx, config)
        else:
            self._start_local(ctx, config)
        self._finalizer = weakref.finalize(self, _stop, self._conns, self._procs)
        # At interpreter exit, shut down as shutdown() does (marked closed first), so that the
        # reader thread does not take the workers' orderly exit for a death.
        atexit.register(_shutdown_if_alive, weakref.ref(self))
        try:
            ready = [self._first_reply(rank, start_timeout_s) for rank in range(self.world_size)]
        except BaseException:
            self.shutdown()
            raise
        self.info = ready[0].info
        self.num_blocks = min(r.num_blocks for r in ready)  # every rank must hold the whole pool
        for conn in self._conns:
            conn.send(self.num_blocks)
        self._reader = threading.Thread(target=self._read_replies, name="orcinus-executor-reader", daemon=True)
        self._reader.start()
        logger.info("%d worker processes (tensor_parallel_size=%d x pipeline_parallel_size=%d, pids %s), "
                    "%d KV blocks each", self.world_size, tp, pp, [r.pid for r in ready], self.num_blocks)

    def _start_local(self, ctx, config: EngineConfig) -> None:
        """Every rank on this machine: pipes to each, and from each stage to the next."""
        tp, pp = self.tp, self.pp
        port = free_port()
        links = {rank: ctx.Pipe(duplex=False) for rank in range(self.world_size - tp)}
        for rank in range(self.world_size):
            parent, child = ctx.Pipe()
            info = RankInfo(rank, tp, pp, "127.0.0.1", port, timeout_s=config.distributed_timeout_s)
            prev_conn = links[rank - tp][0] if rank >= tp else None
            next_conn = links[rank][1] if rank in links else None
            self._procs.append(spawn_worker(ctx, info, config, child, prev_conn, next_conn))
            child.close()
            self._conns.append(parent)
        for recv_end, send_end in links.values():  # the workers hold them now
            recv_end.close()
            send_end.close()

    def _start_networked(self, ctx, config: EngineConfig) -> None:
        """This machine runs the first world_size / nnodes ranks; the other nodes' launchers run
        the rest. Every rank connects back to the control listener opened here."""
        from orcinus.distributed.network import cluster_key, control_port, open_store

        addr, port = master_from_env()
        timeout = config.distributed_timeout_s
        try:
            self._store = open_store(addr, port, True, timeout)
            listener = Listener((addr, control_port(port)), authkey=cluster_key())
        except (OSError, RuntimeError) as exc:
            raise ConfigError(f"cannot listen on MASTER_ADDR={addr} ports {port + 1}-{port + 2} ({exc}); "
                              "set MASTER_ADDR to this machine's address and MASTER_PORT to a free port") from None
        per_node = self.world_size // config.nnodes
        for rank in range(self.world_size):
            info = RankInfo(rank, self.tp, self.pp, addr, port, timeout_s=timeout, networked=True)
            self._procs.append(spawn_worker(ctx, info, config) if rank < per_node else None)
        joined: dict[int, Connection] = {}

        def accept() -> None:
            while len(joined) < self.world_size:
                conn = listener.accept()
                joined[conn.recv()] = conn

        acceptor = threading.Thread(target=accept, daemon=True)
        acceptor.start()
        acceptor.join(timeout)
        listener.close()
        if len(joined) < self.world_size:
            missing = sorted(set(range(self.world_size)) - set(joined))
            _stop(list(joined.values()), [p for p in self._procs if p is not None])
            raise WorkerDied(
                f"ranks {missing} did not join within distributed_timeout_s={timeout:.0f} s; start "
                f"`python -m orcinus.distributed.launch --nnodes {config.nnodes} --node-rank K` with the same "
                f"engine flags on every other node, with MASTER_ADDR={addr} and MASTER_PORT={port}")
        self._conns = [joined[r] for r in range(self.world_size)]

    def _watch(self, rank: int) -> list:
        """What becomes ready when rank answers or dies: its connection, and its process if local."""
        proc = self._procs[rank]
        return [self._conns[rank]] + ([proc.sentinel] if proc is not None else [])

    def _first_reply(self, rank: int, timeout_s: float) -> Ready:
        conn, proc = self._conns[rank], self._procs[rank]
        if not wait(self._watch(rank), timeout_s):
            raise WorkerDied(f"worker {rank} did not start within {timeout_s:.0f} s")
        if not conn.poll():
            if proc is not None:
                proc.join(1.0)
            raise WorkerDied(f"worker {rank} exited during start-up (exit code {getattr(proc, 'exitcode', None)})")
        try:
            reply = conn.recv()
        except EOFError:
            raise WorkerDied(f"worker {rank} disconnected during start-up") from None
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
        sentinels = [p.sentinel for p in self._procs if p is not None]
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
                    if wait(self._watch(rank), self.poll_s) and not conn.poll():
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
        local = [(rank, p) for rank, p in enumerate(self._procs) if p is not None]
        wait([p.sentinel for _, p in local], 1.0)
        for rank, proc in local:
            if wait([proc.sentinel], 0):
                proc.join(1.0)
            if proc.exitcode is not None:
                return (f"worker {rank} (pid {proc.pid}) died with exit code {proc.exitcode}; "
                        "the engine cannot run iterations any more")
        return "a worker stopped answering (or its node went away); the engine cannot run iterations any more"

    def _die(self, reason: str) -> None:
        with self._lock:
            if self._closed:
                return  # shutting down: workers ending now are not a failure
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


def _shutdown_if_alive(ref: "weakref.ref[MultiprocExecutor]") -> None:
    executor = ref()
    if executor is not None:
        executor.shutdown()


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


def spawn_worker(ctx, info: RankInfo, config: EngineConfig, *conns: Connection | None):
    proc = ctx.Process(target=worker_main, args=(info, config, *conns), daemon=True,
                       name=f"orcinus-pp{info.stage}-tp{info.tp_rank}")
    with _main_module_hidden():
        proc.start()
    return proc


def master_from_env() -> tuple[str, int]:
    """torch.distributed's standard rendezvous settings, required across machines."""
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not addr or not port or not port.isdigit():
        raise ConfigError("several nodes need MASTER_ADDR (the first node's address) and MASTER_PORT (a free "
                          "port; the next two are used too) in the environment of every node")
    return addr, int(port)


def _stop(conns: list[Connection], procs: list, grace_s: float = 2.0) -> None:
    """Ask every worker to exit, then terminate and finally kill those that do not (on this machine;
    remote ranks exit when told or when their connection closes)."""
    for i, conn in enumerate(conns):
        proc = procs[i] if i < len(procs) else None
        try:
            # Only when the pipe takes it at once: a stuck worker with a full pipe must not block us.
            if (proc is None or proc.is_alive()) and select.select([], [conn.fileno()], [], 0)[1]:
                conn.send(None)
        except Exception:
            pass
    procs = [p for p in procs if p is not None]
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


def _check_placement(config: EngineConfig, world_size: int) -> None:
    """Fail at once, with what to change, when this machine's ranks cannot each have a GPU."""
    import torch

    from orcinus.executor.cuda_memory import rank_device
    from orcinus.executor.platform import resolve_device

    device = resolve_device(config)
    if device.type == "cuda":
        per_node = max(1, world_size // config.nnodes)
        rank_device(device, per_node - 1, per_node, torch.cuda.device_count())
