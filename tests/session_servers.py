"""Real `orcinus serve` processes that live for a whole test session (fixtures in conftest.py)."""
from __future__ import annotations

from typing import Iterator

from orcinus.bench.server_process import ServerProcess


def serve(tmp_path_factory, name: str, *args: str) -> Iterator[ServerProcess]:
    """Start `orcinus serve *args`, yield it, and at the end require a graceful stop."""
    from server_helpers import log_tail, start_server, stop_server

    log = tmp_path_factory.mktemp("server") / f"{name}.log"
    srv = start_server(log, *args)
    yield srv
    rc = stop_server(srv)
    assert rc == 0, f"the server did not stop gracefully (rc={rc}):\n{log_tail(log)}"
