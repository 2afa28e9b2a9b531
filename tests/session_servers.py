"""Real `orcinus serve` processes that live for a whole test session (fixtures in conftest.py)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:  # imported when a server starts: conftest.py loads this file for every test, and
    # the GPU test files must collect with only the core dependencies (httpx is the bench extra's)
    from orcinus.bench.server_process import ServerProcess


def serve(tmp_path_factory, name: str, *args: str) -> Iterator["ServerProcess"]:
    """Start `orcinus serve *args`, yield it, and at the end require a graceful stop."""
    from server_helpers import log_tail, start_server, stop_server

    log = tmp_path_factory.mktemp("server") / f"{name}.log"
    srv = start_server(log, *args)
    yield srv
    rc = stop_server(srv)
    assert rc == 0, f"the server did not stop gracefully (rc={rc}):\n{log_tail(log)}"
