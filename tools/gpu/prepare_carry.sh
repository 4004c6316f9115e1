#!/usr/bin/env bash
# Copies what tools/gpu/run_gpu_suite.sh needs and the GPU machine lacks into .gpu-deps/ (git
# ignores it): Debian's googletest sources, about 4 MB. Carry `.gpu-deps` along with the tree.
set -euo pipefail
cd "$(dirname "$0")/../.."
src="${GTEST_SOURCES:-/usr/src/googletest}"
[[ -d "$src/googletest/src" ]] || { echo "prepare_carry: no googletest at $src" >&2; exit 2; }
rm -rf .gpu-deps/googletest
mkdir -p .gpu-deps/googletest
cp -r "$src/googletest" "$src/googlemock" .gpu-deps/googletest/
du -sh .gpu-deps
