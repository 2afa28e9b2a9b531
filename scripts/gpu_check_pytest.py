"""A pytest plugin for scripts/gpu_check.sh's test stage (`-p gpu_check_pytest`, with scripts/ on
PYTHONPATH): counts outcomes into the JSON file named by GPU_CHECK_TESTS_JSON after every test, so
that a stage stopped at its time limit still reports what ran. Counts as pytest's summary does:
a failure in setup or teardown is an error, a skip anywhere is a skip."""
from __future__ import annotations

import json
import os

COUNTS = {"collected": 0, "passed": 0, "failed": 0, "skipped": 0, "errors": 0}


def _save() -> None:
    path = os.environ.get("GPU_CHECK_TESTS_JSON")
    if path:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(COUNTS, f)
        os.replace(tmp, path)


def pytest_collectreport(report) -> None:
    if report.failed:  # a file that does not import: pytest then runs nothing
        COUNTS["errors"] += 1
        _save()


def pytest_collection_finish(session) -> None:
    COUNTS["collected"] = len(session.items)
    _save()


def pytest_runtest_logreport(report) -> None:
    if report.skipped:
        COUNTS["skipped"] += 1
    elif report.failed:
        COUNTS["failed" if report.when == "call" else "errors"] += 1
    elif report.passed and report.when == "call":
        COUNTS["passed"] += 1
    else:
        return
    _save()
