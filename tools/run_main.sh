#!/usr/bin/env bash
# The main job: installs what is missing, builds the package and trains the DLRM-style model on
# synthetic Criteo-like data (examples/synthetic_dlrm.py), writing runs/dlrm/summary.json and
# runs/dlrm/plot.png. Extra arguments go to the program: --preset tiny|small|medium, --workers N.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "${repo}"
tools/bootstrap/ensure_env.sh
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
exec bazel run //examples:synthetic_dlrm -- "$@"
