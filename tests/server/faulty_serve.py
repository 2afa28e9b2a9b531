"""`orcinus serve` on a machine whose device fails: every iteration that holds a request whose id
contains "doom", or both "alice" and "bob", raises as a lost device would; others run normally.
Used by test_engine_failure.py as `python faulty_serve.py <serve args>`."""
from __future__ import annotations

import sys

from orcinus.cli import main
from orcinus.executor.model_runner import ModelRunner

_execute = ModelRunner.execute


def _failing_execute(self, requests, *args, **kwargs):
    ids = " ".join(r.request_id for r in requests)
    if "doom" in ids or ("alice" in ids and "bob" in ids):
        raise RuntimeError(f"device lost while running {ids}")  # names requests, as real errors may
    return _execute(self, requests, *args, **kwargs)


ModelRunner.execute = _failing_execute

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
