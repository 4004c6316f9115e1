#!/usr/bin/env bash
# The main job: installs what is missing, builds the package and trains the example recommender
# on synthetic data. Extra arguments go to the training program (try --help).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "${repo}"
tools/bootstrap/ensure_env.sh
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
exec bazel run //examples:toy_training -- "$@"
