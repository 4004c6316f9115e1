#!/usr/bin/env bash
# The whole test suite, as README and CI run it. Installs what is missing first, then runs
# `bazel test //...` in each configuration and prints one line counting every test case:
#   cpu   the default build (CPU kernels, op library, Python package, wheel);
#   cuda  --config=cuda: builds every target with CUDA (kernels, op library, wheel), then runs
#         only what behaves differently there: the CUDA googletests (GPU cases skip on a machine
#         without a GPU and fail on one with a GPU that CUDA cannot use), the lookup tests
#         against the CUDA-built op library, its GPU kernel registrations and the CUDA wheel
#         (installs and works in a fresh venv; packing it twice gives the same bytes), what the
#         op library carries and links (tests/cuda_device_code_test.py) and the runtime stub. The
#         rest of the Python suite would repeat the cpu pass case for case. The toolchain is the
#         hermetic CUDA 12 one that ensure_env.sh --cuda installs: no system CUDA, no GPU;
#   gpu_tf  tools/ci/gpu_tf_suite.sh: the --config=cuda op library under the full tensorflow
#         wheel, its GPU kernel registrations and every test in tests/;
#   gpu_suite  tools/gpu/run_gpu_suite.sh, the lent-GPU command, builds and runs (its cases skip;
#         only where nvcc is installed);
#   asan  --config=asan: the C++ kernel tests under AddressSanitizer + UBSan;
#   consumer  a workspace that vendors this one (tools/ci/consumer_workspace_test.sh);
#   format  clang-format and ruff report nothing to change (tools/ci/check_format.py);
#   fuzz  the kernel library's libFuzzer target for FUZZ_SECONDS (default 60).
# Exits non-zero if anything failed to build or any case failed.
set -uo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "${repo}"
tools/bootstrap/ensure_env.sh --cuda || exit 1

events="$(mktemp -d)"
trap 'rm -rf "${events}"' EXIT
status=0
runs=()

run() {  # run NAME "PATTERN..." [BAZEL FLAGS...]
  local name="$1" patterns="$2"
  shift 2
  echo "=== bazel test $* ${patterns}" >&2
  # shellcheck disable=SC2086  # one pattern per word
  bazel test --keep_going --build_event_json_file="${events}/${name}.json" "$@" -- ${patterns}
  local rc=$?
  # 0: all passed; 3: some tests failed (counted below). Anything else is a build/infra failure.
  if [[ ${rc} != 0 && ${rc} != 3 ]]; then
    echo "bazel test (${name}) exited with ${rc}" >&2
  fi
  [[ ${rc} == 0 ]] || status=1
  runs+=("${name}=${events}/${name}.json")
}

run cpu //...
# The CUDA passes need no GPU and no system CUDA: ensure_env.sh --cuda installed the hermetic
# toolchain (CUDA_PATH may name another toolkit).
echo "=== bazel build --config=cuda //..." >&2
bazel build --keep_going --config=cuda //... || status=1
run cuda "//embedding/kernels:embedding_lookup_cuda_test //embedding/kernels:integer_lookup_cuda_test //embedding/kernels:sparse_update_cuda_test //tests:embedding_lookup_test //tests:gpu_registration_test //tests:cuda_device_code_test //third_party/cuda:cudart_stub_test //tools/wheel:wheel_test" --config=cuda

# The same op library under the full tensorflow wheel: its GPU registrations, then every test
# of tests/ (the CPU kernels must behave there as under tensorflow-cpu).
echo "=== tools/ci/gpu_tf_suite.sh" >&2
tools/ci/gpu_tf_suite.sh "${events}/gpu_tf.xml" || status=1
runs+=("gpu_tf=xml:${events}/gpu_tf.xml")

# The lent-GPU command builds with nvcc and without Bazel, and runs the hermetic build's CUDA tests
# that prepare_carry.sh puts beside it; here their cases skip (no GPU), so this checks that both
# still build and run. Only where an nvcc is installed (a GPU machine has one).
if command -v nvcc >/dev/null 2>&1 || [[ -x /usr/local/cuda/bin/nvcc ]]; then
  echo "=== tools/gpu/prepare_carry.sh; tools/gpu/run_gpu_suite.sh --no-benchmark" >&2
  failure=""
  { bash tools/gpu/prepare_carry.sh &&
    DE_REQUIRE_GPU=0 OUT="${events}/gpu-suite" bash tools/gpu/run_gpu_suite.sh --no-benchmark; } >&2 ||
    failure='<failure message="tools/gpu/prepare_carry.sh or run_gpu_suite.sh failed"/>'
  [[ -z "${failure}" ]] || status=1
  printf '%s\n' '<testsuites><testsuite name="gpu_suite" tests="1">' \
    "<testcase classname=\"gpu_suite\" name=\"builds_without_bazel\">${failure}</testcase>" \
    '</testsuite></testsuites>' > "${events}/gpu_suite.xml"
  runs+=("gpu_suite=xml:${events}/gpu_suite.xml")
fi
run asan //embedding/kernels/... --config=asan

echo "=== tools/ci/consumer_workspace_test.sh" >&2
tools/ci/consumer_workspace_test.sh "${events}/consumer.json" || status=1
runs+=("consumer=${events}/consumer.json")

echo "=== tools/ci/check_format.py" >&2
.venv/bin/python3 tools/ci/check_format.py "${events}/format.xml" || status=1
runs+=("format=xml:${events}/format.xml")

echo "=== tools/fuzz/run_fuzzer.sh ${FUZZ_SECONDS:-60}" >&2
tools/fuzz/run_fuzzer.sh "${FUZZ_SECONDS:-60}" "${events}/fuzz.xml" || status=1
runs+=("fuzz=xml:${events}/fuzz.xml")

.venv/bin/python3 tools/ci/summarize_tests.py "${runs[@]}" || status=1
exit ${status}
