#!/usr/bin/env bash
# The GPU checks in one unattended run, for a machine with a CUDA GPU and no internet (written for
# the lent H100/H200 machines: their image has torch, triton, transformers and pytest).
#
#   bash scripts/gpu_check.sh [--dry-run] [OUT_DIR]
#
# Stages (each a process with its own time limit, the whole run within 8 minutes): the machine,
# a Qwen3-0.6B-shaped random checkpoint, `bench offline` on issue 11's GPU trace for orcinus'
# paged backend with CUDA graphs (with --profile and the floor) and without (--enforce-eager),
# the gpu test tier (the files listed in src/orcinus/bench/gpu_check.py), and transformers'
# static `generate` and continuous batching. OUT_DIR/summary.json is rewritten after every stage;
# its shape and everything else: src/orcinus/bench/gpu_check.py. --dry-run runs the same stages on
# the CPU at toy scale (the Triton kernel under TRITON_INTERPRET=1); CI runs it on every change.
#
# No package beyond the image's is needed (the GPU path imports none of the server's packages nor
# gguf). Should one ever be, wheels in ./.whl (ignored by git) are installed into /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || { echo "gpu_check: installing .whl/ failed" >&2; exit 2; }
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
exec python3 -m orcinus.bench.gpu_check "$@"
