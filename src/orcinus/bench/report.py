"""Shared report plumbing: the machine a number came from, markdown tables, JSON files.

A benchmark number without its machine, date and command is not reproducible, so every report
carries all three.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import os
import platform
import shlex
import sys
from typing import Any, Sequence

from orcinus.cpu_features import cpu_model  # noqa: F401  (re-exported: bench modules name it here)


def machine_info(device: str | None = None) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    info["load_avg_1m"] = load_average()  # other work on a shared machine skews timings
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    if device is not None:
        info["device"] = device
    return info


def load_average() -> float | None:
    """The 1-minute load average; above the core count, someone else's work shared the CPUs."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def command_line() -> str:
    """The command as typed, for pasting back into a shell."""
    argv = list(sys.argv)
    if argv and argv[0].endswith(("orcinus/__main__.py", "orcinus")):
        argv = ["orcinus", *argv[1:]]
    return " ".join(shlex.quote(a) for a in argv)


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        if math.isinf(value):
            return "inf"
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else str(obj)  # JSON has no NaN or Infinity
    return obj


def write_json(path: str, payload: Any) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(path, "w") as f:
        json.dump(_jsonable(payload), f, indent=2)
        f.write("\n")
