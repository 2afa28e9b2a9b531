"""Control connections for several machines. On one machine the executor hands each worker its
pipes; across machines every rank instead connects to the engine with Python's standard
`multiprocessing.connection` (pickled messages over TCP, authenticated with a shared key), and
pipeline neighbours find each other through a torch.distributed TCPStore.

Ports: MASTER_PORT for torch.distributed itself, MASTER_PORT + 1 for the engine's control
listener, MASTER_PORT + 2 for the store. Set the same ORCINUS_CLUSTER_KEY on every node."""
from __future__ import annotations

import os
import socket
import time
from datetime import timedelta
from multiprocessing.connection import Client, Connection, Listener

CLUSTER_KEY_ENV = "ORCINUS_CLUSTER_KEY"


def cluster_key() -> bytes:
    return os.environ.get(CLUSTER_KEY_ENV, "orcinus-control").encode()


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


def _connect_with_retry(address: tuple[str, int], timeout_s: float) -> Connection:
    """Other nodes may start before the engine listens: keep trying until the timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return Client(address, authkey=cluster_key())
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise ConnectionRefusedError(
                    f"nothing listens at {address[0]}:{address[1]} (MASTER_ADDR, MASTER_PORT + 1) after "
                    f"{timeout_s:.0f} s; start the engine on the first node, or fix MASTER_ADDR / MASTER_PORT") from None
            time.sleep(0.5)


def connect_rank(rank: int, tp: int, pp: int, master_addr: str, master_port: int, timeout_s: float
                 ) -> tuple[Connection, Connection | None, Connection | None]:
    """(connection to the engine, from the previous stage, to the next stage) of one rank."""
    conn = _connect_with_retry((master_addr, control_port(master_port)), timeout_s)
    conn.send(rank)
    stage = rank // tp
    store = open_store(master_addr, master_port, False, timeout_s)
    listener = None
    if stage > 0:  # publish where the previous stage's rank can reach us, before anyone waits
        listener = Listener((own_address(master_addr, master_port), 0), authkey=cluster_key())
        host, port = listener.address
        store.set(f"orcinus/link/{rank}", f"{host}:{port}")
    next_conn = None
    if stage < pp - 1:
        host, port = store.get(f"orcinus/link/{rank + tp}").decode().rsplit(":", 1)
        next_conn = Client((host, int(port)), authkey=cluster_key())
    prev_conn = listener.accept() if listener is not None else None
    if listener is not None:
        listener.close()
    return conn, prev_conn, next_conn
