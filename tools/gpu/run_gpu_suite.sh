#!/usr/bin/env bash
# One command for a lent GPU machine, which has nvcc, PyTorch and CuPy but no Bazel, no TensorFlow
# and no internet: builds the kernel library and its CUDA googletests with nvcc and g++, runs
# them, then runs the GPU benchmark (tools/benchmarks/gpu/run_gpu_benchmark.sh). Results land as
# JSON under $OUT (default .gpu-suite/): one googletest report per suite, the benchmark's report,
# and summary.json with the counts.
#
#   bash tools/gpu/run_gpu_suite.sh                 # on the GPU machine
#   DE_REQUIRE_GPU=0 bash tools/gpu/run_gpu_suite.sh --no-benchmark   # build check without a GPU
#
# googletest comes from $GTEST_ROOT, else .gpu-deps/googletest (tools/gpu/prepare_carry.sh copies
# Debian's sources there, about 4 MB, to carry along), else /usr/src/googletest. The suites in
# .gpu-deps/hermetic (prepare_carry.sh: the hermetic clang build of our wheel) run as well. Compute
# capabilities: $DE_CUDA_ARCHS (default "80 90": A100, H100/H200). Without a GPU the tests skip,
# which counts as a failure unless DE_REQUIRE_GPU=0: a GPU machine must never pass by skipping.
set -euo pipefail
cd "$(dirname "$0")/../.."
out="${OUT:-.gpu-suite}"
build="$out/build"
mkdir -p "$build"
run_benchmark=1
[[ "${1:-}" == "--no-benchmark" ]] && run_benchmark=0
export DE_REQUIRE_GPU="${DE_REQUIRE_GPU:-1}"

gtest_root="${GTEST_ROOT:-}"
for candidate in .gpu-deps/googletest /usr/src/googletest; do
  [[ -z "$gtest_root" && -d "$candidate/googletest/src" ]] && gtest_root="$candidate"
done
[[ -n "$gtest_root" ]] || { echo "run_gpu_suite: no googletest sources found" >&2; exit 2; }
nvcc="${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}"
# The CUDA root: $CUDA_PATH, /usr/local/cuda, or the folder above nvcc (which may be a wrapper).
cuda_root=""
for candidate in "${CUDA_PATH:-}" /usr/local/cuda "$(dirname "$(dirname "$(readlink -f "$nvcc")")")"; do
  [[ -z "$cuda_root" && -n "$candidate" && -f "$candidate/include/cuda_runtime_api.h" ]] &&
    cuda_root="$candidate"
done
[[ -n "$cuda_root" ]] || { echo "run_gpu_suite: no CUDA headers found" >&2; exit 2; }
arch_flags=()
for arch in ${DE_CUDA_ARCHS:-80 90}; do
  arch_flags+=(-gencode "arch=compute_${arch},code=sm_${arch}")
done
cxx_flags=(-std=c++17 -O2 -fno-math-errno -ffp-contract=off -I. -isystem "$cuda_root/include")
gtest_includes=(-isystem "$gtest_root/googletest/include" -isystem "$gtest_root/googlemock/include")

start=$(date +%s)
# Background jobs, each of whose failure fails the build.
jobs_started=()
spawn() { "$@" & jobs_started+=($!); }
join() {
  local failed=0
  for pid in "${jobs_started[@]}"; do wait "$pid" || failed=1; done
  jobs_started=()
  ((failed == 0)) || { echo "run_gpu_suite: build failed" >&2; exit 1; }
}
# googletest and gmock, and the kernel library's host sources, compiled in parallel.
spawn g++ "${cxx_flags[@]}" "${gtest_includes[@]}" -I "$gtest_root/googletest" \
  -I "$gtest_root/googlemock" -c "$gtest_root/googletest/src/gtest-all.cc" -o "$build/gtest-all.o"
spawn g++ "${cxx_flags[@]}" "${gtest_includes[@]}" -I "$gtest_root/googletest" \
  -I "$gtest_root/googlemock" -c "$gtest_root/googlemock/src/gmock-all.cc" -o "$build/gmock-all.o"
spawn g++ "${cxx_flags[@]}" "${gtest_includes[@]}" \
  -c "$gtest_root/googletest/src/gtest_main.cc" -o "$build/gtest_main.o"
host_sources=(embedding_lookup_cpu embedding_lookup_cpu_double embedding_lookup_weighted_cpu
  huge_pages input_errors
  sparse_update_cpu integer_lookup_cpu)
for src in "${host_sources[@]}"; do
  spawn g++ "${cxx_flags[@]}" -O3 -c "embedding/kernels/$src.cc" -o "$build/$src.o"
done
cuda_sources=(embedding_lookup_cuda integer_lookup_cuda sparse_update_cuda)
for src in "${cuda_sources[@]}"; do
  spawn "$nvcc" -std=c++17 -O3 -I. "${arch_flags[@]}" -c "embedding/kernels/$src.cu" \
    -o "$build/$src.o"
done
join
objects=()
for src in "${host_sources[@]}" "${cuda_sources[@]}" gtest-all gmock-all gtest_main; do
  objects+=("$build/$src.o")
done
suites=(embedding_lookup_cuda_test integer_lookup_cuda_test sparse_update_cuda_test)
for suite in "${suites[@]}"; do
  spawn g++ "${cxx_flags[@]}" "${gtest_includes[@]}" "embedding/kernels/$suite.cc" "${objects[@]}" \
    -L "$cuda_root/lib64" -lcudart_static -lpthread -ldl -lrt -o "$build/$suite"
done
join
echo "run_gpu_suite: built in $(($(date +%s) - start)) s" >&2

status=0
reports=()
for suite in "${suites[@]}"; do
  "$build/$suite" --gtest_output="json:$out/$suite.json" || status=1
  reports+=("$suite")
done
# The same suites as the hermetic CUDA 12 build of the wheel compiled them (prepare_carry.sh),
# with the runtime stub finding the carried libcudart.so.12 on the loader's path.
for binary in .gpu-deps/hermetic/*_test; do
  [[ -x "$binary" ]] || continue
  suite="hermetic-$(basename "$binary")"
  LD_LIBRARY_PATH="$PWD/.gpu-deps/hermetic" "$binary" --gtest_output="json:$out/$suite.json" ||
    status=1
  reports+=("$suite")
done
python3 - "$out" "${reports[@]}" <<'PY'
import json, sys
out, suites = sys.argv[1], sys.argv[2:]
counts = {"passed": 0, "failed": 0, "skipped": 0}
for suite in suites:
  try:
    with open(f"{out}/{suite}.json") as f:
      report = json.load(f)
  except (OSError, ValueError):  # the suite crashed before writing its report
    counts["failed"] += 1
    continue
  for group in report.get("testsuites", []):
    for case in group.get("testsuite", []):
      if case.get("failures"):
        counts["failed"] += 1
      elif case.get("result") == "SKIPPED" or case.get("status") == "NOTRUN":
        counts["skipped"] += 1
      else:
        counts["passed"] += 1
with open(f"{out}/summary.json", "w") as f:
  json.dump(counts, f)
print(f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped")
PY
if ((run_benchmark)); then
  OUT="$out" bash tools/benchmarks/gpu/run_gpu_benchmark.sh || status=1
fi
echo "run_gpu_suite: done in $(($(date +%s) - start)) s" >&2
exit "$status"
