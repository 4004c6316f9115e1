// CUDA implementation of the sparse optimizer updates (sparse_update_cuda.h).
#include <algorithm>
#include <climits>
#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_run_length_encode.cuh>
#include <cub/device/device_scan.cuh>
#include <limits>
#include <string>
#include <type_traits>

#include "embedding/kernels/cuda_util.h"
#include "embedding/kernels/lookup_rules.h"
#include "embedding/kernels/sparse_update_cuda.h"

namespace distributed_embeddings {
namespace {

using cuda_internal::Blocks;
using cuda_internal::Carver;
using cuda_internal::EndBit;
using cuda_internal::kNoError;
using cuda_internal::kWarp;
using cuda_internal::kWarpsPerBlock;

struct IndexVerdict {
  unsigned long long bad;  // the first position with an index outside [0, num_rows)
  int64_t value;           // indices[bad]
};

template <typename IdT>
using Key = typename std::make_unsigned<IdT>::type;

// Keys for the sort (the indices, all valid once checked) and their positions.
template <typename IdT>
__global__ void CheckAndKeyKernel(const IdT* indices, int64_t n, int64_t num_rows,
                                  IndexVerdict* verdict, Key<IdT>* keys, int64_t* positions) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < n;
       j += stride) {
    if (!InRange(indices[j], num_rows))
      atomicMin(&verdict->bad, static_cast<unsigned long long>(j));
    keys[j] = static_cast<Key<IdT>>(indices[j]);
    positions[j] = j;
  }
}

template <typename IdT>
__global__ void VerdictValueKernel(const IdT* indices, IndexVerdict* verdict) {
  if (verdict->bad != kNoError) verdict->value = static_cast<int64_t>(indices[verdict->bad]);
}

// Correctly rounded operations that nvcc may not fuse into multiply-adds (it does contract plain
// a * b + c by default), so each rounds as the CPU kernel's and Keras's do.
__device__ __forceinline__ float Add(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ float Sub(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ float Mul(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ float Div(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ float Sqrt(float a) { return __fsqrt_rn(a); }
__device__ __forceinline__ double Add(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ double Sub(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ double Mul(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ double Div(double a, double b) { return __ddiv_rn(a, b); }
__device__ __forceinline__ double Sqrt(double a) { return __dsqrt_rn(a); }

// A warp per distinct row; lane k owns columns k, k + 32, ... The row's gradient is the sum of its
// rows of `grad` in position order; the rules are sparse_update.h's, written with the operations
// above.
template <SparseRule kRule, typename T, typename IdT>
__global__ void UpdateKernel(SparseHyper<T> hyper, SparseTable<T> table, const T* __restrict__ grad,
                             const Key<IdT>* __restrict__ run_keys,
                             const int* __restrict__ run_lengths,
                             const int64_t* __restrict__ run_starts,
                             const int* __restrict__ num_runs,
                             const int64_t* __restrict__ sorted_positions) {
  const int lane = threadIdx.x;
  const int64_t width = table.width;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t u = blockIdx.x * static_cast<int64_t>(blockDim.y) + threadIdx.y; u < *num_runs;
       u += warps) {
    const int64_t row = static_cast<int64_t>(run_keys[u]);
    const int64_t begin = run_starts[u], end = begin + run_lengths[u];
    T* w = table.weights + row * width;
    T row_mean = 0;
    if (kRule == SparseRule::kRowwiseAdagrad) {
      T squares = 0;
      for (int64_t k = lane; k < width; k += kWarp) {
        T g = 0;
        for (int64_t j = begin; j < end; ++j) g = Add(g, grad[sorted_positions[j] * width + k]);
        squares = Add(squares, Mul(g, g));
      }
      for (int offset = kWarp / 2; offset > 0; offset /= 2) {
        squares = Add(squares, __shfl_xor_sync(0xffffffffu, squares, offset));
      }
      row_mean = Div(squares, static_cast<T>(width));
    }
    T denominator = 1;
    if (kRule == SparseRule::kRowwiseAdagrad) {
      T* a = table.slots[0] + row;
      const T updated = Add(*a, row_mean);
      __syncwarp();  // every lane has read the old value
      if (lane == 0) *a = updated;
      denominator = Sqrt(Add(updated, hyper.epsilon));
    }
    const T lr = hyper.learning_rate;
    for (int64_t k = lane; k < width; k += kWarp) {
      T g = 0;
      for (int64_t j = begin; j < end; ++j) g = Add(g, grad[sorted_positions[j] * width + k]);
      if (kRule == SparseRule::kSgd) {
        w[k] = Sub(w[k], Mul(g, lr));
      } else if (kRule == SparseRule::kAdagrad) {
        T* a = table.slots[0] + row * width;
        a[k] = Add(a[k], Mul(g, g));
        w[k] = Sub(w[k], Div(Mul(lr, g), Sqrt(Add(a[k], hyper.epsilon))));
      } else if (kRule == SparseRule::kRowwiseAdagrad) {
        w[k] = Sub(w[k], Div(Mul(lr, g), denominator));
      } else {
        T* m = table.slots[0] + row * width;
        T* v = table.slots[1] + row * width;
        m[k] = Add(m[k], Mul(Sub(g, m[k]), hyper.one_minus_beta1));
        v[k] = Add(v[k], Mul(Sub(Mul(g, g), v[k]), hyper.one_minus_beta2));
        w[k] = Sub(w[k], Div(Mul(m[k], lr), Add(Sqrt(v[k]), hyper.epsilon)));
      }
    }
  }
}

template <typename T, typename IdT>
struct UpdateScratch {
  IndexVerdict* verdict;
  Key<IdT>* keys_in;
  Key<IdT>* keys_out;
  int64_t* positions_in;
  int64_t* positions_out;
  Key<IdT>* run_keys;
  int* run_lengths;
  int* num_runs;
  int64_t* run_starts;
  void* cub_temp;
  size_t cub_temp_bytes;
  size_t total_bytes;

  UpdateScratch(void* base, int64_t n) {
    const int count = static_cast<int>(std::min<int64_t>(n, INT_MAX));
    size_t sort_bytes = 0, rle_bytes = 0, scan_bytes = 0;
    cub::DeviceRadixSort::SortPairs(
        nullptr, sort_bytes, static_cast<const Key<IdT>*>(nullptr), static_cast<Key<IdT>*>(nullptr),
        static_cast<const int64_t*>(nullptr), static_cast<int64_t*>(nullptr), count);
    cub::DeviceRunLengthEncode::Encode(nullptr, rle_bytes, static_cast<const Key<IdT>*>(nullptr),
                                       static_cast<Key<IdT>*>(nullptr), static_cast<int*>(nullptr),
                                       static_cast<int*>(nullptr), count);
    cub::DeviceScan::ExclusiveSum(nullptr, scan_bytes, static_cast<const int*>(nullptr),
                                  static_cast<int64_t*>(nullptr), count);
    cub_temp_bytes = std::max({sort_bytes, rle_bytes, scan_bytes, size_t{1}});
    Carver carver(base);
    verdict = carver.Take<IndexVerdict>(1);
    keys_in = carver.Take<Key<IdT>>(n);
    keys_out = carver.Take<Key<IdT>>(n);
    positions_in = carver.Take<int64_t>(n);
    positions_out = carver.Take<int64_t>(n);
    run_keys = carver.Take<Key<IdT>>(n);
    run_lengths = carver.Take<int>(n);
    num_runs = carver.Take<int>(1);
    run_starts = carver.Take<int64_t>(n);
    cub_temp = carver.Take<char>(cub_temp_bytes);
    total_bytes = carver.used();
  }
};

template <SparseRule kRule, typename T, typename IdT>
Status Launch(const SparseHyper<T>& hyper, const SparseTable<T>& table, const T* grad,
              const UpdateScratch<T, IdT>& s, int64_t n, cudaStream_t stream) {
  const dim3 block(kWarp, kWarpsPerBlock);
  UpdateKernel<kRule, T, IdT><<<Blocks(n, kWarpsPerBlock), block, 0, stream>>>(
      hyper, table, grad, s.run_keys, s.run_lengths, s.run_starts, s.num_runs, s.positions_out);
  DE_RETURN_IF_CUDA_ERROR(cudaGetLastError(), "UpdateKernel launch");
  return Status::Ok();
}

}  // namespace

template <typename T, typename IdT>
size_t SparseUpdateCudaWorkspaceBytes(int64_t num_indices) {
  return UpdateScratch<T, IdT>(nullptr, std::max<int64_t>(num_indices, 0)).total_bytes;
}

template <typename T, typename IdT>
Status SparseUpdateCuda(SparseRule rule, const SparseHyper<T>& hyper, const SparseTable<T>& table,
                        const IdT* indices, int64_t num_indices, const T* grad, void* workspace,
                        size_t workspace_bytes, cudaStream_t stream) {
  if (table.num_rows < 0 || table.width < 0 || num_indices < 0) {
    return Status::InvalidArgument(
        "sizes must be non-negative; got num_rows " + std::to_string(table.num_rows) + ", width " +
        std::to_string(table.width) + ", num_indices " + std::to_string(num_indices) + ".");
  }
  if (num_indices > INT_MAX) {
    return Status::InvalidArgument("at most " + std::to_string(INT_MAX) +
                                   " indices per call on the GPU; got " +
                                   std::to_string(num_indices) + ".");
  }
  for (int k = 0; k < SparseRuleSlots(rule); ++k) {
    if (table.slots[k] == nullptr && table.num_rows > 0) {
      return Status::InvalidArgument("the rule's state slot " + std::to_string(k) + " is missing.");
    }
  }
  if (num_indices == 0) return Status::Ok();
  UpdateScratch<T, IdT> s(workspace, num_indices);
  if (s.total_bytes > workspace_bytes) {
    return Status::Internal("SparseUpdateCuda: workspace too small");
  }
  const int n = static_cast<int>(num_indices);
  const int threads = 256;
  DE_RETURN_IF_CUDA_ERROR(cudaMemsetAsync(s.verdict, 0xff, sizeof(IndexVerdict), stream),
                          "cudaMemsetAsync");
  CheckAndKeyKernel<<<Blocks(n, threads), threads, 0, stream>>>(
      indices, n, table.num_rows, s.verdict, s.keys_in, s.positions_in);
  DE_RETURN_IF_CUDA_ERROR(cudaGetLastError(), "CheckAndKeyKernel launch");
  VerdictValueKernel<<<1, 1, 0, stream>>>(indices, s.verdict);
  DE_RETURN_IF_CUDA_ERROR(cudaGetLastError(), "VerdictValueKernel launch");
  IndexVerdict verdict;
  DE_RETURN_IF_CUDA_ERROR(
      cudaMemcpyAsync(&verdict, s.verdict, sizeof(verdict), cudaMemcpyDeviceToHost, stream),
      "cudaMemcpyAsync");
  DE_RETURN_IF_CUDA_ERROR(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
  if (verdict.bad != kNoError) {
    return Status::InvalidArgument("'indices' must lie in [0, " + std::to_string(table.num_rows) +
                                   "); got indices[" + std::to_string(verdict.bad) +
                                   "] = " + std::to_string(verdict.value) + ".");
  }
  if (table.width == 0) return Status::Ok();

  // Every key is a valid index, at most num_rows - 1, and never wider than the key type.
  const int end_bit = std::min(EndBit(table.num_rows - 1), static_cast<int>(8 * sizeof(IdT)));
  size_t temp = s.cub_temp_bytes;
  DE_RETURN_IF_CUDA_ERROR(
      cub::DeviceRadixSort::SortPairs(s.cub_temp, temp, s.keys_in, s.keys_out, s.positions_in,
                                      s.positions_out, n, 0, end_bit, stream),
      "DeviceRadixSort::SortPairs");
  temp = s.cub_temp_bytes;
  DE_RETURN_IF_CUDA_ERROR(
      cub::DeviceRunLengthEncode::Encode(s.cub_temp, temp, s.keys_out, s.run_keys, s.run_lengths,
                                         s.num_runs, n, stream),
      "DeviceRunLengthEncode::Encode");
  temp = s.cub_temp_bytes;
  DE_RETURN_IF_CUDA_ERROR(
      cub::DeviceScan::ExclusiveSum(s.cub_temp, temp, s.run_lengths, s.run_starts, n, stream),
      "DeviceScan::ExclusiveSum");
  switch (rule) {
    case SparseRule::kSgd:
      return Launch<SparseRule::kSgd>(hyper, table, grad, s, num_indices, stream);
    case SparseRule::kAdagrad:
      return Launch<SparseRule::kAdagrad>(hyper, table, grad, s, num_indices, stream);
    case SparseRule::kRowwiseAdagrad:
      return Launch<SparseRule::kRowwiseAdagrad>(hyper, table, grad, s, num_indices, stream);
    case SparseRule::kLazyAdam:
      return Launch<SparseRule::kLazyAdam>(hyper, table, grad, s, num_indices, stream);
  }
  return Status::Internal("unknown rule");
}

#define DE_INSTANTIATE_SPARSE_UPDATE_CUDA(T, IdT)                                            \
  template size_t SparseUpdateCudaWorkspaceBytes<T, IdT>(int64_t);                           \
  template Status SparseUpdateCuda(SparseRule, const SparseHyper<T>&, const SparseTable<T>&, \
                                   const IdT*, int64_t, const T*, void*, size_t, cudaStream_t);
DE_INSTANTIATE_SPARSE_UPDATE_CUDA(float, int32_t)
DE_INSTANTIATE_SPARSE_UPDATE_CUDA(float, int64_t)
DE_INSTANTIATE_SPARSE_UPDATE_CUDA(double, int32_t)
DE_INSTANTIATE_SPARSE_UPDATE_CUDA(double, int64_t)
#undef DE_INSTANTIATE_SPARSE_UPDATE_CUDA

}  // namespace distributed_embeddings
