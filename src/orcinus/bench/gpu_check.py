"""`scripts/gpu_check.sh`'s stages: the first run on a GPU, prepared so that it produces numbers.

    python -m orcinus.bench.gpu_check [--dry-run] OUT

Stages, each a process of its own with its own time limit, in this order:
  machine      torch/CUDA/Triton/transformers versions and the device (machine.txt); without CUDA
               (and without --dry-run) the run stops here with exit status 2
  checkpoint   a Qwen3-0.6B-shaped checkpoint with random weights (`bench random-checkpoint`)
  paged        `bench offline --backends paged` (CUDA graphs on) with --profile and the floor
  paged-eager  the same with --enforce-eager
  gpu-tests    the gpu test tier: the files in GPU_TEST_FILES, `-m gpu`
  hf, hf-cb    transformers' static `generate` and its continuous batching on the same trace
The trace is issue 11's: 256 requests, prompts and outputs U(100, 1024), all at once.

`--bundle` (for machines that return only a few files of OUT, as the lent ones return 8): OUT
then holds only summary.json, machine.txt and gpu_check.tar.gz, the logs and reports of every
stage so far, refreshed after each stage; the stages work in a temporary folder.

After every stage OUT/summary.json is rewritten whole (write, then rename) with what is known
so far, so a run cut short keeps every finished stage's numbers:
  {"device": str, "stages": [{"name": str, "rc": int, "seconds": float}],
   "throughput_tok_s": {"<backend>": float}, "floor_tok_s": float,
   "gpu_tests": {"collected": int, "passed": int, "failed": int, "skipped": int, "errors": int}}
rc is the stage's exit status, 124 when it ran out of time, -1 when it did not run (no time left
in the total, or the checkpoint it needs is missing). A backend that failed has no throughput
entry; floor_tok_s is 0.0 until the paged stage measured it. Logs: OUT/<stage>.log, bench
reports: OUT/bench-<backend>.json, per-test outcomes: OUT/gpu_tests.json.

Time: the stages' limits add up to GPU_CHECK_TOTAL_S (450 s by default) and no stage may run
past what is left of it, so the whole run, model creation included, ends within 8 minutes on
an H100/H200 (the lease of 15 minutes also pays for the machine's start). Each limit can be
changed with GPU_CHECK_<STAGE>_S (e.g. GPU_CHECK_HF_CB_S=120).

`--dry-run`: the same stages on the CPU at toy scale, so CI runs this very code on every change:
a scaled-down checkpoint (one layer), 4 requests, float32, and the paged backends on the Triton kernel under
TRITON_INTERPRET=1 (CUDA graphs are off on a CPU, so paged and paged-eager run the same way).

Needs nothing beyond torch, triton, pytest and orcinus' core dependencies that the GPU image has
(transformers, numpy, safetensors, tokenizers, tqdm, jinja2); the server's packages (fastapi,
pydantic, uvicorn), gguf and the test extra are never imported (tests/scripts/test_gpu_check.py
runs the dry run with them hidden).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]  # the repository (this file is src/orcinus/bench/)

# Every test file with gpu-marked tests; tests/scripts/test_gpu_check.py checks none is missing.
GPU_TEST_FILES = (
    "tests/attention/test_triton_paged.py",
    "tests/bench/test_profile.py",
    "tests/engine/test_gpu_tier.py",
    "tests/executor/test_cuda_graphs_gpu.py",
    "tests/executor/test_bf16_decode_gpu.py",
    "tests/executor/test_cuda_memory_gpu.py",
)
# Modules the stages import; the machine stage says which are missing.
REQUIRED_MODULES = ("torch", "triton", "transformers", "numpy", "safetensors", "tokenizers", "tqdm", "jinja2",
                    "pytest")

TOTAL_S = 450.0
MIN_STAGE_S = 15.0  # a stage with less time left than this is not started
# (name, time limit on a GPU in seconds): run in this order
# Guesses, none measured yet: transformers' static generate runs ~1,000 steps of a 256-row batch with
# a growing cache, and its continuous batching was ~2 % of the floor on an H100 on this trace.
GPU_LIMITS = {"machine": 20, "checkpoint": 45, "paged": 80, "paged-eager": 55, "gpu-tests": 110, "hf": 80,
              "hf-cb": 90}
DRY_RUN_LIMIT_S = 300  # per stage on a busy CI machine
DRY_RUN_TOTAL_S = 1500.0

GPU_TRACE = ["--num-requests", "256", "--prompt-len", "100:1024", "--output-len", "100:1024", "--max-num-seqs", "256"]
DRY_TRACE = ["--num-requests", "4", "--prompt-len", "8:40", "--output-len", "2:6", "--max-num-seqs", "4"]
# Qwen3-0.6B's layout scaled down: GQA (2 query heads per KV head), tied embeddings
DRY_CHECKPOINT = ["hidden_size=64", "intermediate_size=128", "num_hidden_layers=1", "num_attention_heads=4",
                  "num_key_value_heads=2", "head_dim=32", "vocab_size=512", "max_position_embeddings=256",
                  "bos_token_id=1", "eos_token_id=2"]

MACHINE_CHECK = r"""
import importlib, sys
dry = sys.argv[1] == "1"
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda)
missing = []
for name in sys.argv[2:]:
    try:
        mod = importlib.import_module(name)
        print(name, getattr(mod, "__version__", "?"))
    except ImportError as exc:
        missing.append(name)
        print(name, "MISSING:", exc)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", torch.cuda.get_device_name(0), f"{p.total_memory / 2**30:.0f} GiB", "count", torch.cuda.device_count())
elif not dry:
    raise SystemExit("gpu_check: no CUDA device here; these checks need one (--dry-run runs them on the CPU)")
else:
    print("device cpu (dry run)")
if missing:
    raise SystemExit(f"gpu_check: missing modules {missing}: the stages that import them will fail")
"""


@dataclass
class Stage:
    name: str
    argv: list[str]
    limit_s: float
    env: dict[str, str] = field(default_factory=dict)
    needs_checkpoint: bool = False
    backend: str | None = None  # a bench stage: the backend label its throughput is recorded under
    report: Path | None = None  # a bench stage's JSON report


def stage_limit(name: str, default: float) -> float:
    return float(os.environ.get(f"GPU_CHECK_{name.upper().replace('-', '_')}_S", default))


def plan(out: Path, dry_run: bool, python: str = sys.executable) -> list[Stage]:
    ckpt = out / "checkpoint" if dry_run else Path("/tmp/orcinus-qwen3-0.6b")
    orcinus = [python, "-m", "orcinus"]
    limits = {n: stage_limit(n, DRY_RUN_LIMIT_S if dry_run else s) for n, s in GPU_LIMITS.items()}
    interp = {"TRITON_INTERPRET": "1"} if dry_run else {}
    stages = [Stage("machine", [python, "-c", MACHINE_CHECK, "1" if dry_run else "0", *REQUIRED_MODULES],
                    limits["machine"])]
    overrides = [a for kv in DRY_CHECKPOINT for a in ("--override", kv)] if dry_run else []
    stages.append(Stage("checkpoint", [*orcinus, "bench", "random-checkpoint", "qwen3-0.6b", str(ckpt), *overrides],
                        limits["checkpoint"]))
    common = ["--model", str(ckpt), "--seed", "0", "--no-progress", "--dataset", "random",
              *(DRY_TRACE if dry_run else GPU_TRACE)]
    # dry run: a small KV pool, as the interpreter copies every tensor argument at each launch
    common += ["--device", "cpu", "--dtype", "float32", "--kv-cache-memory", str(8 << 20)] if dry_run \
        else ["--device", "cuda"]
    paged = ["--attention-backend", "triton"]  # what `auto` picks on CUDA; named, so the dry run runs it too

    def bench(name: str, backend: str, *extra: str, env: dict[str, str] | None = None) -> Stage:
        report = out / f"bench-{name}.json"
        return Stage(name, [*orcinus, "bench", "offline", "--backends", backend, *common, *extra,
                            "--output-json", str(report)],
                     limits[name], env or {}, needs_checkpoint=True, backend=name, report=report)

    stages.append(bench("paged", "paged", *paged, "--profile", env=interp))
    stages.append(bench("paged-eager", "paged", *paged, "--enforce-eager", "--no-floor", env=interp))
    stages.append(Stage("gpu-tests", [python, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider",
                                      "-p", "gpu_check_pytest", *GPU_TEST_FILES],
                        # only the plugins named here: an image's own pytest plugins cannot break the run
                        limits["gpu-tests"], {"GPU_CHECK_TESTS_JSON": str(out / "gpu_tests.json"),
                                              "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",
                                              "PYTHONPATH": _prepend_path(str(ROOT / "scripts"))}))
    stages.append(bench("hf", "hf", "--no-floor"))
    stages.append(bench("hf-cb", "hf-cb", "--no-floor"))
    return stages


def _prepend_path(entry: str) -> str:
    rest = os.environ.get("PYTHONPATH", "")
    return f"{entry}{os.pathsep}{rest}" if rest else entry


class Summary:
    """OUT/summary.json, rewritten whole after every stage."""

    def __init__(self, path: Path, device: str) -> None:
        self.path = path
        self.data: dict = {"device": device, "stages": [], "throughput_tok_s": {}, "floor_tok_s": 0.0,
                           "gpu_tests": {"collected": 0, "passed": 0, "failed": 0, "skipped": 0, "errors": 0}}

    def save(self) -> None:
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=2) + "\n")
        os.replace(tmp, self.path)

    def add_stage(self, name: str, rc: int, seconds: float) -> None:
        self.data["stages"].append({"name": name, "rc": int(rc), "seconds": round(float(seconds), 2)})
        self.save()

    def read_bench(self, backend: str, report: Path) -> None:
        """The backend's output tokens/s (when it ran without error) and the floor, if measured."""
        try:
            data = json.loads(report.read_text())
        except (OSError, ValueError):
            return
        for res in data.get("results", []):
            if res.get("status") == "ok" and res.get("elapsed_s", 0) > 0:
                self.data["throughput_tok_s"][backend] = res["output_tokens"] / res["elapsed_s"]
        floor = (data.get("floor") or {}).get("output_tokens_per_s")
        if isinstance(floor, (int, float)) and floor > 0:
            self.data["floor_tok_s"] = float(floor)

    def read_tests(self, path: Path) -> None:
        try:
            counts = json.loads(path.read_text())
        except (OSError, ValueError):
            return
        self.data["gpu_tests"] = {k: int(counts.get(k, 0)) for k in self.data["gpu_tests"]}


def run_stage(stage: Stage, limit_s: float, log: Path) -> int:
    """Run the stage's process (and all it starts) with stdout and stderr in `log`; at the limit
    the whole process group is stopped (SIGTERM, then SIGKILL) and 124 returned, as timeout(1)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **stage.env}
    with open(log, "wb") as f:
        proc = subprocess.Popen(stage.argv, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                start_new_session=True)
        try:
            return proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            _stop_group(proc)
            f.write(f"\ngpu_check: stage {stage.name} stopped at its limit of {limit_s:.0f} s\n".encode())
            return 124
        except BaseException:  # Ctrl-C: leave nothing running
            _stop_group(proc)
            raise


def _stop_group(proc: subprocess.Popen) -> None:
    for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(path: Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="the same stages on the CPU at toy scale")
    parser.add_argument("--bundle", action="store_true",
                        help="OUT gets summary.json, machine.txt and gpu_check.tar.gz (all logs and reports) only")
    parser.add_argument("out", nargs="?", default=os.environ.get("OUT") or "gpu_check_out")
    args = parser.parse_args(argv)
    results = Path(args.out).resolve()
    results.mkdir(parents=True, exist_ok=True)
    out = Path(tempfile.mkdtemp(prefix="gpu_check-")) if args.bundle else results
    total = float(os.environ.get("GPU_CHECK_TOTAL_S", DRY_RUN_TOTAL_S if args.dry_run else TOTAL_S))
    deadline = time.monotonic() + total
    stages = plan(out, args.dry_run)
    summary = Summary(results / "summary.json", "cpu (dry run)" if args.dry_run else "cuda")
    summary.save()
    print(f"gpu_check: {len(stages)} stages within {total:.0f} s; results in {results}", flush=True)
    try:
        return _run_stages(stages, summary, out, results, deadline, args.dry_run, args.bundle)
    finally:
        if args.bundle:
            shutil.rmtree(out, ignore_errors=True)


def _bundle(work: Path, results: Path) -> None:
    """The stages' files (not folders: the dry run's checkpoint stays out) into one archive."""
    tmp = results / "gpu_check.tar.gz.tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        for f in sorted(work.iterdir()):
            if f.is_file():
                tar.add(f, arcname=f.name)
    os.replace(tmp, results / "gpu_check.tar.gz")


def _run_stages(stages: list[Stage], summary: Summary, out: Path, results: Path, deadline: float, dry_run: bool,
                bundle: bool) -> int:
    failed = []
    for stage in stages:
        if bundle:
            _bundle(out, results)
        left = deadline - time.monotonic()
        missing_ckpt = stage.needs_checkpoint and not _stage_ok(summary, "checkpoint")
        if left < MIN_STAGE_S or missing_ckpt:
            why = "no checkpoint" if missing_ckpt else f"{left:.0f} s left of the total"
            print(f"== {stage.name}: not run ({why})", flush=True)
            summary.add_stage(stage.name, -1, 0.0)
            failed.append(stage.name)
            continue
        limit = min(stage.limit_s, left)
        print(f"== {stage.name} (limit {limit:.0f} s)", flush=True)
        log = out / f"{stage.name}.log"
        started = time.monotonic()
        rc = run_stage(stage, limit, log)
        seconds = time.monotonic() - started
        if stage.name == "machine":
            (results / "machine.txt").write_text(log.read_text(errors="replace"))
            if rc != 0 and not dry_run and "no CUDA device here" in log.read_text(errors="replace"):
                print(_tail(log, 5), flush=True)
                summary.add_stage(stage.name, rc, seconds)
                return 2
            device = next((ln.split(" ", 1)[1] for ln in log.read_text(errors="replace").splitlines()
                           if ln.startswith("device ")), None)
            if device:
                summary.data["device"] = device
        if stage.report is not None and stage.backend is not None:
            summary.read_bench(stage.backend, stage.report)
        if stage.name == "gpu-tests":
            summary.read_tests(out / "gpu_tests.json")
        summary.add_stage(stage.name, rc, seconds)
        shown = summary.data["throughput_tok_s"].get(stage.backend or "")
        print(f"   rc={rc} in {seconds:.1f} s" + (f", {shown:.1f} output tok/s" if shown else ""), flush=True)
        if rc != 0 or (stage.backend and shown is None):
            failed.append(stage.name)
            print(_tail(log, 15), flush=True)
    if bundle:
        _bundle(out, results)
    print(json.dumps(summary.data, indent=2), flush=True)
    where = results / "gpu_check.tar.gz" if bundle else results
    print(f"gpu_check: {'all stages passed' if not failed else 'failed: ' + ', '.join(failed)}; logs in {where}",
          flush=True)
    return 0 if not failed else 1


def _stage_ok(summary: Summary, name: str) -> bool:
    return any(s["name"] == name and s["rc"] == 0 for s in summary.data["stages"])


if __name__ == "__main__":
    sys.exit(main())
