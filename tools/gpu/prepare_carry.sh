#!/usr/bin/env bash
# Copies what tools/gpu/run_gpu_suite.sh needs and the GPU machine lacks into .gpu-deps/ (git
# ignores it); carry `.gpu-deps` along with the tree:
#   googletest/  Debian's googletest sources (about 4 MB), for the suite's own nvcc build;
#   hermetic/    the CUDA googletests as --config=cuda builds them here with the hermetic CUDA 12
#                toolchain (clang, libnvfatbin, the runtime stub), linked statically, and that
#                toolchain's libcudart.so.12 (about 21 MB). run_gpu_suite.sh runs them too, so a
#                lent GPU checks the device code our wheel ships, not only an nvcc build of it.
#                Skipped with --no-hermetic (needs Bazel and tools/bootstrap/ensure_env.sh --cuda).
set -euo pipefail
cd "$(dirname "$0")/../.."
src="${GTEST_SOURCES:-/usr/src/googletest}"
[[ -d "$src/googletest/src" ]] || { echo "prepare_carry: no googletest at $src" >&2; exit 2; }
rm -rf .gpu-deps/googletest .gpu-deps/hermetic
mkdir -p .gpu-deps/googletest
cp -r "$src/googletest" "$src/googlemock" .gpu-deps/googletest/

if [[ "${1:-}" != "--no-hermetic" ]]; then
  targets=(embedding/kernels:embedding_lookup_cuda_test embedding/kernels:integer_lookup_cuda_test
    embedding/kernels:sparse_update_cuda_test third_party/cuda:cudart_stub_test)
  # Our libraries linked statically: nothing of Bazel's _solib tree is needed there, only glibc
  # 2.35 and libstdc++ (GLIBCXX_3.4.29), as on Ubuntu 22.04.
  flags=(--config=cuda --dynamic_mode=off)
  bazel build "${flags[@]}" "${targets[@]/#/\/\/}"
  bin="$(bazel info "${flags[@]}" bazel-bin 2>/dev/null)"
  mkdir -p .gpu-deps/hermetic
  for target in "${targets[@]}"; do
    cp "$bin/${target/://}" .gpu-deps/hermetic/
  done
  cp -L .toolchains/cuda-12.5/lib64/libcudart.so.12 .gpu-deps/hermetic/
  chmod -R u+w .gpu-deps/hermetic
fi
du -sh .gpu-deps
