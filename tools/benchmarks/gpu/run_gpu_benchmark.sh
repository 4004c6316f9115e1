#!/usr/bin/env bash
# Builds the CUDA kernel library's C ABI with nvcc (no Bazel, no TensorFlow needed) and runs the
# GPU benchmark against torch embedding_bag. For a machine with a GPU, nvcc and PyTorch:
#   bash tools/benchmarks/gpu/run_gpu_benchmark.sh [benchmark args...]
# Writes the library and results under $OUT (default: .gpu-bench/).
set -euo pipefail
cd "$(dirname "$0")/../../.."
out="${OUT:-.gpu-bench}"
mkdir -p "$out"
nvcc -O3 -std=c++17 -shared -Xcompiler -fPIC -I. \
  -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
  embedding/kernels/embedding_lookup_cuda.cu embedding/kernels/embedding_lookup_cpu.cc \
  embedding/kernels/input_errors.cc tools/benchmarks/gpu/lookup_capi.cc \
  -o "$out/libde_lookup_capi.so"
python3 tools/benchmarks/gpu/gpu_lookup_benchmark.py --lib "$out/libde_lookup_capi.so" \
  --json "$out/gpu_benchmark.json" "$@"
