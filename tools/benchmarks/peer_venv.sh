#!/usr/bin/env bash
# Creates (only when missing) the FBGEMM peer's virtual environment at $REPO/.venv-fbgemm and
# prints its python. The TF venv (.venv) already has torch 2.13.0+cpu for the torch peer, but
# FBGEMM's CPU wheel is built against a matching torch release, so it gets a venv of its own.
#
#   tools/benchmarks/peer_venv.sh                 # prints /path/to/repo/.venv-fbgemm/bin/python
#   PY=$(tools/benchmarks/peer_venv.sh) && "$PY" tools/benchmarks/train_step_peers.py --check ...
#
# What was needed (found when this was written): only PyPI is reachable, and
# PyPI's torch 2.14.0 for Linux x86_64 is the CUDA 13 build (555 MB wheel, 1.2 GB installed).
# Installed with --no-deps plus its pure-Python dependencies it does NOT import:
# libtorch_cuda.so links libcudnn, libcublas, libcusparse, libnccl, ... directly
# ("ImportError: libcudnn.so.9"), even on a machine with no GPU. So torch is installed with its
# full dependencies: cuda-toolkit 13.0.3 and the nvidia-* wheels (3.2 GB) and triton (0.9 GB).
# fbgemm-gpu-cpu 1.9.0 is a 6 MB wheel whose only dependency is numpy (2.4.6 resolved, pinned).
# The venv is about 5.5 GB and takes about a minute and a half to build from a warm pip cache.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="$REPO/.venv-fbgemm"
PY="$VENV/bin/python"
TORCH_VERSION="2.14.0"
FBGEMM_VERSION="1.9.0"
NUMPY_VERSION="2.4.6"

ready() {
  [[ -x "$PY" ]] && "$PY" -c "import torch, fbgemm_gpu, numpy" >/dev/null 2>&1
}

if ready; then
  echo "$PY"
  exit 0
fi

# The same interpreter as the TF venv when there is one (FBGEMM's wheel is per CPython version).
BASE_PY="python3"
if [[ -x "$REPO/.venv/bin/python" ]]; then
  BASE_PY="$(readlink -f "$REPO/.venv/bin/python")"
fi
if [[ ! -x "$PY" ]]; then
  "$BASE_PY" -m venv "$VENV" >&2
fi
PIP=("$PY" -m pip install --quiet --disable-pip-version-check)

# The CUDA wheels come along (see above); torch runs on the CPU without a GPU or driver.
"${PIP[@]}" "torch==$TORCH_VERSION" "fbgemm-gpu-cpu==$FBGEMM_VERSION" "numpy==$NUMPY_VERSION" >&2

if ! ready; then
  echo "peer_venv.sh: $VENV was built but 'import torch, fbgemm_gpu, numpy' fails:" >&2
  "$PY" -c "import torch, fbgemm_gpu, numpy" >&2 || true
  exit 1
fi
echo "$PY"
