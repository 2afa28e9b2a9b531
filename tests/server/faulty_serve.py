"""`orcinus serve` on a machine whose device fails: once an iteration holds a request whose id
contains "doom", the device is lost and every later iteration that runs requests raises, as a
lost GPU would (so the engine's re-runs in isolation fail too). Used by test_engine_failure.py as
`python faulty_serve.py <serve args>`."""
from __future__ import annotations

import sys

from orcinus.cli import main
from orcinus.executor.worker import Worker

_execute = Worker.execute
_lost = False


def _failing_execute(self, msg, *args, **kwargs):
    global _lost
    ids = " ".join(r.request_id for r in msg.requests)
    _lost = _lost or "doom" in ids
    if _lost and msg.requests:
        raise RuntimeError(f"device lost while running {ids}")  # names requests, as real errors may
    return _execute(self, msg, *args, **kwargs)


Worker.execute = _failing_execute

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
