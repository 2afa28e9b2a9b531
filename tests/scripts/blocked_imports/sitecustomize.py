"""Put on PYTHONPATH by tests/scripts/test_gpu_check.py: every Python process started with it
fails to import the top-level modules named in ORCINUS_TEST_BLOCKED_MODULES (comma-separated),
as on a machine where those packages are not installed."""
import importlib.abc
import os
import sys

_BLOCKED = frozenset(m for m in os.environ.get("ORCINUS_TEST_BLOCKED_MODULES", "").split(",") if m)


class _Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in _BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test: not installed there)",
                                      name=name)
        return None


if _BLOCKED:
    sys.meta_path.insert(0, _Blocker())
