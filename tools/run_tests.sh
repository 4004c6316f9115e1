#!/usr/bin/env bash
# The whole test suite, as README and CI run it. Installs what is missing first, then runs
# `bazel test //...` in each configuration and prints one line counting every test case:
#   cpu   the default build (CPU kernels, op library, Python package, wheel);
#   cuda  --config=cuda: also compiles and links every CUDA target; GPU cases skip without a GPU
#         (only when nvcc is installed);
#   asan  --config=asan: the C++ kernel tests under AddressSanitizer + UBSan;
#   fuzz  the kernel library's libFuzzer target for FUZZ_SECONDS (default 60).
# Exits non-zero if anything failed to build or any case failed.
set -uo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "${repo}"
tools/bootstrap/ensure_env.sh || exit 1

events="$(mktemp -d)"
trap 'rm -rf "${events}"' EXIT
status=0
runs=()

run() {  # run NAME PATTERN [BAZEL FLAGS...]
  local name="$1" pattern="$2"
  shift 2
  echo "=== bazel test $* ${pattern}" >&2
  bazel test --keep_going --build_event_json_file="${events}/${name}.json" "$@" -- "${pattern}"
  local rc=$?
  # 0: all passed; 3: some tests failed (counted below). Anything else is a build/infra failure.
  if [[ ${rc} != 0 && ${rc} != 3 ]]; then
    echo "bazel test (${name}) exited with ${rc}" >&2
  fi
  [[ ${rc} == 0 ]] || status=1
  runs+=("${name}=${events}/${name}.json")
}

run cpu //...
if [[ -x "${CUDA_PATH:-/usr/local/cuda}/bin/nvcc" ]]; then
  run cuda //... --config=cuda
fi
run asan //embedding/kernels/... --config=asan

echo "=== tools/fuzz/run_fuzzer.sh ${FUZZ_SECONDS:-60}" >&2
tools/fuzz/run_fuzzer.sh "${FUZZ_SECONDS:-60}" "${events}/fuzz.xml" || status=1
runs+=("fuzz=xml:${events}/fuzz.xml")

.venv/bin/python3 tools/ci/summarize_tests.py "${runs[@]}" || status=1
exit ${status}
