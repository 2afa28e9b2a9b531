#!/usr/bin/env bash
# The GPU checks of the speed work in one run, for a machine with a CUDA GPU and no internet
# (written for the lent H100/H200 machines: their image has torch, triton and transformers).
#
#   bash scripts/gpu_check.sh [OUT_DIR]
#
# 1. the gpu test tier (`pytest -m gpu`): the Triton paged-attention kernel against the reference
#    backend, CUDA-graph capture and replay against eager, no host sync inside the forward pass;
# 2. issue 11's GPU trace on a Qwen3-0.6B-shaped checkpoint with random weights: 256 requests,
#    prompts and outputs U(100,1024), orcinus (CUDA graphs on, then off) against transformers'
#    static `generate` and continuous batching, with the floor and the per-iteration breakdown.
# Logs and JSON results go to OUT_DIR (default $OUT, else ./gpu_check_out). Each part has its own
# time limit (GPU_CHECK_TEST_S, GPU_CHECK_BENCH_S seconds) so that one stuck part cannot eat the
# others' time; the whole run is sized for about 10 minutes.
#
# Python packages orcinus needs that such an image may lack travel as wheels in ./.whl (ignored by
# git); on a machine with the package registries, from the repository root:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl gguf fastapi starlette uvicorn pydantic pydantic-core annotated-types \
#     typing-inspection typing-extensions opentelemetry-api
# (the python version is the GPU machine's `python3 --version`; 3.1 MB in all on 2026-12-03, when
# fastapi 0.165 needed opentelemetry-api and pydantic 2.14 a newer typing-extensions: check each
# wheel's `Requires-Dist` against the image's packages when versions move). This script installs them into
# /tmp/site when ./.whl exists and runs orcinus from ./src, so nothing else is installed.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-gpu_check_out}}"
mkdir -p "$out"
test_s="${GPU_CHECK_TEST_S:-240}"
bench_s="${GPU_CHECK_BENCH_S:-300}"
export PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || { echo "gpu_check: installing .whl/ failed" >&2; exit 2; }
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}"

python3 - <<'EOF' 2>&1 | tee "$out/machine.txt"
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda)
if not torch.cuda.is_available():
    raise SystemExit("gpu_check: no CUDA device here; these checks need one")
print("device", torch.cuda.get_device_name(0), f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
import triton, transformers
print("triton", triton.__version__, "transformers", transformers.__version__)
EOF
[ "${PIPESTATUS[0]}" -eq 0 ] || exit 2
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv >>"$out/machine.txt" 2>&1

echo "== gpu tests (limit ${test_s}s)"
timeout "$test_s" python3 -m pytest -m gpu -q -rs -p no:cacheprovider tests 2>&1 | tee "$out/gpu_tests.log" | tail -25
tests_rc=${PIPESTATUS[0]}

echo "== GPU trace (limit ${bench_s}s)"
ckpt=/tmp/orcinus-qwen3-0.6b
timeout 120 python3 -m orcinus bench random-checkpoint qwen3-0.6b "$ckpt" 2>&1 | tail -3
common=(--model "$ckpt" --device cuda --num-requests 256 --prompt-len 100:1024 --output-len 100:1024
        --max-num-seqs 256 --seed 0)
timeout "$bench_s" python3 -m orcinus bench offline "${common[@]}" --backends paged,orca,hf,hf-cb --profile \
    --output-json "$out/gpu-qwen3-0.6b.json" 2>&1 | grep -v "it/s\]\|req/s\]\|batch/s\]" | tee "$out/bench.log" | tail -40
bench_rc=${PIPESTATUS[0]}
timeout 120 python3 -m orcinus bench offline "${common[@]}" --backends paged --enforce-eager \
    --output-json "$out/gpu-qwen3-0.6b-eager.json" 2>&1 | grep -v "it/s\]\|req/s\]\|batch/s\]" | tee "$out/bench-eager.log" | tail -8
eager_rc=${PIPESTATUS[0]}

echo "gpu_check: tests rc=$tests_rc, bench rc=$bench_rc, eager bench rc=$eager_rc; logs in $out"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] && [ "$eager_rc" -eq 0 ]
