"""Control connections for several machines. On one machine the executor hands each worker its
pipes; across machines every rank instead connects to the engine over TCP, and pipeline
neighbours find each other through a torch.distributed TCPStore.

Ports: MASTER_PORT for torch.distributed itself, MASTER_PORT + 1 for the engine's control
listener, MASTER_PORT + 2 for the store. Set the same ORCINUS_CLUSTER_KEY on every node: there is
no default key (a public one let anyone who reached the port send the engine a pickle).

The handshake (issue 19): the listener and the connecting rank prove to each other that they
hold the key (multiprocessing's HMAC challenge, both ways), then the rank says who it is in a
JSON object ({"rank": N}), read as plain data. A connection with a wrong key, a bad hello, a rank
already joined, or one that says nothing for HANDSHAKE_TIMEOUT_S, is refused and logged, and the
listener goes on waiting for the right node. Only after that do both ends exchange the engine's
messages, which stay pickled: both ends then hold the key, i.e. they are the same deployment, and
the messages are dataclasses of the executor contract (executor/messages.py) that JSON would only
re-encode by hand on every iteration.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from datetime import timedelta
from typing import Callable
from multiprocessing.connection import (AuthenticationError, Client, Connection, answer_challenge,
                                        deliver_challenge)

from orcinus.errors import ConfigError

logger = logging.getLogger(__name__)

CLUSTER_KEY_ENV = "ORCINUS_CLUSTER_KEY"
MIN_KEY_CHARS = 16
HANDSHAKE_TIMEOUT_S = 10.0
_HELLO_MAX_BYTES = 1024


class ClusterJoinError(ConfigError):
    """The nodes could not form the cluster (missing, wrong-key or unreachable nodes); says what to set."""


def cluster_key() -> bytes:
    """The shared key, from ORCINUS_CLUSTER_KEY; there is no default."""
    key = os.environ.get(CLUSTER_KEY_ENV, "")
    if len(key) < MIN_KEY_CHARS:
        problem = "is not set" if not key else f"has {len(key)} characters, fewer than {MIN_KEY_CHARS}"
        raise ConfigError(f"several nodes need a shared secret in {CLUSTER_KEY_ENV} ({problem}); set the same "
                          f"value on every node, e.g. export {CLUSTER_KEY_ENV}=$(python -c "
                          "'import secrets; print(secrets.token_hex(16))')")
    return key.encode()


def control_port(master_port: int) -> int:
    return master_port + 1


def store_port(master_port: int) -> int:
    return master_port + 2


def own_address(master_addr: str, master_port: int) -> str:
    """This machine's address as the master sees it (the interface that routes to it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((master_addr, master_port))  # UDP: no packet is sent
        return s.getsockname()[0]


def open_store(master_addr: str, master_port: int, is_master: bool, timeout_s: float):
    import torch.distributed as dist

    return dist.TCPStore(master_addr, store_port(master_port), is_master=is_master,
                         timeout=timedelta(seconds=timeout_s), wait_for_workers=False)


class RankListener:
    """A TCP listener that hands out only connections that proved the key and said which rank
    they are; everything else is refused, logged, and forgotten."""

    def __init__(self, address: tuple[str, int], key: bytes) -> None:
        self.key = key
        self.sock = socket.create_server(address)
        self.sock.settimeout(0.2)  # the accept loop looks at its deadline this often
        self.address = self.sock.getsockname()[:2]
        self.refused: list[str] = []  # one line per refused connection, for the final error

    def accept_ranks(self, wanted: set[int], timeout_s: float, local: set[int] = frozenset(),
                     local_timeout_s: float = 600.0, give_up: Callable[[], bool] = lambda: False
                     ) -> dict[int, Connection]:
        """Connections of the wanted ranks, as many as join within timeout_s. The `local` ranks
        (started on this machine) get local_timeout_s to join, and the other nodes get timeout_s
        from when they have: starting this machine's workers (long on a busy machine) is not the
        other nodes' time. give_up() ends the wait early (a local worker died)."""
        joined: dict[int, Connection] = {}
        lock = threading.Lock()
        deadline = time.monotonic() + (local_timeout_s if local else timeout_s)
        clock_restarted = not local
        handlers: list[threading.Thread] = []
        while time.monotonic() < deadline:
            with lock:
                if set(joined) >= wanted:
                    break
                if not clock_restarted and set(joined) >= local:
                    clock_restarted = True
                    deadline = time.monotonic() + timeout_s
            try:
                sock, peer = self.sock.accept()
            except socket.timeout:
                if give_up():
                    break
                continue
            thread = threading.Thread(target=self._handshake, args=(sock, peer, wanted, joined, lock), daemon=True)
            thread.start()
            handlers.append(thread)
        for thread in handlers:
            thread.join(HANDSHAKE_TIMEOUT_S + 1)
        return joined

    def close(self) -> None:
        self.sock.close()

    def _handshake(self, sock: socket.socket, peer: tuple, wanted: set[int], joined: dict[int, Connection],
                   lock: threading.Lock) -> None:
        who = f"{peer[0]}:{peer[1]}"
        sock.setblocking(True)
        guard = sock.dup()  # shutting it down wakes a handshake blocked on a silent peer
        conn = Connection(sock.detach())
        timer = threading.Timer(HANDSHAKE_TIMEOUT_S, _shutdown_quietly, args=(guard,))
        timer.start()
        try:
            deliver_challenge(conn, self.key)
            answer_challenge(conn, self.key)
            rank = _read_hello(conn)
        except AuthenticationError:
            self._refuse(conn, f"refused a connection from {who}: it does not hold this engine's {CLUSTER_KEY_ENV}")
            return
        except (OSError, EOFError, ValueError) as exc:
            self._refuse(conn, f"refused a connection from {who}: no valid handshake within "
                               f"{HANDSHAKE_TIMEOUT_S:.0f} s ({type(exc).__name__}: {exc})")
            return
        finally:
            timer.cancel()
            guard.close()
        with lock:
            if rank not in wanted or rank in joined:
                problem = "is not expected here" if rank not in wanted else "has joined already"
                self._refuse(conn, f"refused a connection from {who}: rank {rank} {problem}")
                return
            joined[rank] = conn
        logger.info("rank %d joined from %s", rank, who)

    def _refuse(self, conn: Connection, line: str) -> None:
        logger.warning(line)
        self.refused.append(line)
        try:
            conn.close()
        except OSError:
            pass


def _read_hello(conn: Connection) -> int:
    hello = json.loads(conn.recv_bytes(_HELLO_MAX_BYTES).decode("utf-8"))
    rank = hello.get("rank") if isinstance(hello, dict) else None
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
        raise ValueError(f"the hello must be a JSON object with a rank, got {str(hello)[:80]!r}")
    return rank


def _shutdown_quietly(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def connect_as(address: tuple[str, int], rank: int, timeout_s: float, what: str) -> Connection:
    """Connect to a RankListener and introduce ourselves; other nodes may start before the engine
    listens, so keep trying until the timeout. Errors say what to fix, in one line."""
    key = cluster_key()
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            conn = Client(address, authkey=key)
            break
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise ClusterJoinError(
                    f"nothing listens at {address[0]}:{address[1]} ({what}) after {timeout_s:.0f} s; start the "
                    "engine on the first node, or fix MASTER_ADDR / MASTER_PORT") from None
            time.sleep(0.5)
        except AuthenticationError:
            raise ClusterJoinError(f"{address[0]}:{address[1]} ({what}) refused this node's {CLUSTER_KEY_ENV}: set "
                                   "the same key as on the first node") from None
        except (EOFError, ConnectionResetError):
            raise ClusterJoinError(f"{address[0]}:{address[1]} ({what}) closed the connection during the handshake; "
                                   f"check that {CLUSTER_KEY_ENV} matches the first node's") from None
    conn.send_bytes(json.dumps({"rank": rank}).encode())
    return conn


def connect_rank(rank: int, tp: int, pp: int, master_addr: str, master_port: int, timeout_s: float
                 ) -> tuple[Connection, Connection | None, Connection | None]:
    """(connection to the engine, from the previous stage, to the next stage) of one rank."""
    conn = connect_as((master_addr, control_port(master_port)), rank, timeout_s,
                      "the engine's control port, MASTER_ADDR:MASTER_PORT + 1")
    stage = rank // tp
    store = open_store(master_addr, master_port, False, timeout_s)
    listener = None
    if stage > 0:  # publish where the previous stage's rank can reach us, before anyone waits
        listener = RankListener((own_address(master_addr, master_port), 0), cluster_key())
        host, port = listener.address
        store.set(f"orcinus/link/{rank}", f"{host}:{port}")
    next_conn = None
    if stage < pp - 1:
        host, port = store.get(f"orcinus/link/{rank + tp}").decode().rsplit(":", 1)
        next_conn = connect_as((host, int(port)), rank, timeout_s, f"rank {rank + tp} of the next stage")
    prev_conn = None
    if listener is not None:
        prev = listener.accept_ranks({rank - tp}, timeout_s)
        listener.close()
        if rank - tp not in prev:
            raise ClusterJoinError(f"rank {rank - tp} of the previous stage did not connect within {timeout_s:.0f} s")
        prev_conn = prev[rank - tp]
    return conn, prev_conn, next_conn
