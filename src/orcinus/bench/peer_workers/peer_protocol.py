"""The plain-data protocol between `bench offline` and a peer worker process (vLLM, llama.cpp).

A peer runs in an interpreter of its own (often another virtual environment, without orcinus),
so this file and the workers beside it use the standard library only: a worker is started as
`python peer_worker_X.py REQUEST.json RESULT.json` and imports this file from its own folder.

Request: {"model", "dtype", "threads", "max_num_seqs", "mode": "batch" | "single",
          "trace": [[prompt_token_ids, output_len], ...], "warmup": k}
Result:  {"status": "ok" | "n/a: why" | "error: what", "load_s", "elapsed_s", "cpu_s",
          "output_tokens", "version", "settings", "single": [{"ttft_s", "tpot_s", "output_tokens"}]}

CPU time is the worker's whole process tree (a peer may run its engine in a child process, as
vLLM does), read from /proc at the start and end of the timed run.
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback

EXIT_NOT_INSTALLED = 3


def read_request(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def write_result(path: str, result: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, path)  # the parent never reads half a result


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after its last ')'
    return text[text.rindex(")") + 2:].split()


def tree_cpu_seconds(root: int | None = None) -> float:
    """User + system CPU seconds of `root` (default: this process), every live descendant, and
    the children each has reaped. Linux only (/proc); elsewhere this process's own rusage."""
    root = os.getpid() if root is None else root
    if not os.path.isdir("/proc"):
        import resource

        ru = resource.getrusage(resource.RUSAGE_SELF)
        return ru.ru_utime + ru.ru_stime
    tick = os.sysconf("SC_CLK_TCK")
    children: dict[int, list[int]] = {}
    cpu: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        fields = _stat_fields(int(name))
        if fields is None:
            continue
        pid, ppid = int(name), int(fields[1])  # fields[0] is the state, [1] the parent
        children.setdefault(ppid, []).append(pid)
        # utime, stime, cutime, cstime: fields 14-17 of stat, 11-14 after the name
        cpu[pid] = sum(int(x) for x in fields[11:15])
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += cpu.get(pid, 0)
        todo.extend(children.get(pid, []))
    return total / tick


class Clock:
    """Wall and process-tree CPU time of one timed run."""

    def __enter__(self) -> "Clock":
        self.cpu0, self.t0 = tree_cpu_seconds(), time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.elapsed_s = time.perf_counter() - self.t0
        self.cpu_s = tree_cpu_seconds() - self.cpu0


def not_installed(result_path: str, package: str, exc: BaseException) -> int:
    write_result(result_path, {"status": f"n/a: {package} is not importable by {sys.executable} "
                                         f"({type(exc).__name__}: {exc}); install it with "
                                         "scripts/install_peers.sh, or point bench offline at the "
                                         "interpreter that has it"})
    return EXIT_NOT_INSTALLED


def run_worker(run, package: str) -> int:
    """A worker's main: `run(request) -> result dict`, errors written as a result, not lost."""
    request_path, result_path = sys.argv[1], sys.argv[2]
    request = read_request(request_path)
    try:
        result = run(request)
    except ImportError as exc:
        return not_installed(result_path, package, exc)
    except Exception as exc:  # reported to the parent, with the traceback on stderr
        traceback.print_exc()
        write_result(result_path, {"status": f"error: {type(exc).__name__}: {str(exc)[:300]}"})
        return 1
    write_result(result_path, {"status": "ok"} | result)
    return 0
