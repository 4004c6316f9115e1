#!/usr/bin/env bash
# Builds a Bazel workspace that vendors this repository as README's "Using from another Bazel
# workspace" shows (local_repository + distributed_embeddings_dependencies()) and runs its tests:
# a C++ googletest on the kernel library and a Python test importing the package. Offline, like
# everything else. The workspace lives in .bazel/consumer_workspace, so reruns are incremental.
#   tools/ci/consumer_workspace_test.sh [BEP_JSON]
set -uo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
python="${DE_PYTHON:-${repo}/.venv/bin/python3}"
work="${repo}/.bazel/consumer_workspace"
template="${repo}/tools/ci/consumer_workspace"

mkdir -p "${work}"
sed -e "s|@REPO@|${repo}|" -e "s|@PYTHON@|${python}|" "${template}/WORKSPACE.in" >"${work}/WORKSPACE"
cp "${template}/BUILD.in" "${work}/BUILD"
cp "${template}/bazelrc.in" "${work}/.bazelrc"
cp "${template}/kernel_test.cc" "${template}/import_test.py" "${work}/"

cd "${work}"
bep=()
[[ $# -ge 1 ]] && bep=(--build_event_json_file="$1")
bazel test --keep_going "${bep[@]}" //...
