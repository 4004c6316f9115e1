// CUDA implementations of the pooled embedding lookup, its sparse backward and COO conversion.
//
// Validation: one pass over row_splits and ids records the first offending position of each kind
// with atomicMin, and a one-thread kernel gathers the values the messages show; the host reads
// that verdict back with one copy (the forward's only synchronization; the backward adds one to
// read the number of unique ids) and builds the same message, in the same order, as the CPU.
// Forward: a warp per bag, lanes across the width, rows read in id order (deterministic sums).
// Backward: a stable radix sort of (id, position) pairs groups occurrences by id in position order;
// run-length encoding gives the unique ids, and a warp per unique id sums its gradient rows.
#include <algorithm>
#include <climits>
#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_run_length_encode.cuh>
#include <cub/device/device_scan.cuh>
#include <limits>
#include <string>
#include <type_traits>

#include "embedding/kernels/cuda_util.h"
#include "embedding/kernels/embedding_lookup_cuda.h"
#include "embedding/kernels/input_errors.h"
#include "embedding/kernels/lookup_rules.h"

namespace distributed_embeddings {
namespace {

using cuda_internal::AlignUp;
using cuda_internal::Blocks;
using cuda_internal::Carver;
using cuda_internal::EndBit;
using cuda_internal::kNoError;
using cuda_internal::kWarp;
using cuda_internal::kWarpsPerBlock;

// First offending positions found by the validation kernels, and the values the error messages
// show, gathered on the device so that the host reads the whole verdict with one copy.
struct ValidationResult {
  unsigned long long bad_split;  // b with row_splits[b] > row_splits[b + 1]
  unsigned long long bad_id;     // j with ids[j] outside [0, num_rows)
  unsigned long long bad_coo;    // j with indices[j] out of bounds or out of order
  int64_t first_split;           // row_splits[0]
  int64_t last_split;            // row_splits[batch]
  int64_t split_value;           // row_splits[bad_split]
  int64_t split_next;            // row_splits[bad_split + 1]
  int64_t id_value;              // ids[bad_id]
};

template <typename IdT, typename OffsetT>
__global__ void ValidateCsrKernel(CsrIds<IdT, OffsetT> csr, int64_t num_rows, bool check_ids,
                                  ValidationResult* result) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; b < csr.batch;
       b += stride) {
    if (csr.row_splits[b] > csr.row_splits[b + 1]) {
      atomicMin(&result->bad_split, static_cast<unsigned long long>(b));
    }
  }
  if (!check_ids) return;
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < csr.nnz;
       j += stride) {
    if (!InRange(csr.ids[j], num_rows)) {
      atomicMin(&result->bad_id, static_cast<unsigned long long>(j));
    }
  }
}

// One thread, after ValidateCsrKernel: copies the values the messages need into `result`.
template <typename IdT, typename OffsetT>
__global__ void GatherCsrErrorValues(CsrIds<IdT, OffsetT> csr, ValidationResult* result) {
  result->first_split = static_cast<int64_t>(csr.row_splits[0]);
  result->last_split = static_cast<int64_t>(csr.row_splits[csr.batch]);
  if (result->bad_split != kNoError) {
    result->split_value = static_cast<int64_t>(csr.row_splits[result->bad_split]);
    result->split_next = static_cast<int64_t>(csr.row_splits[result->bad_split + 1]);
  }
  if (result->bad_id != kNoError) result->id_value = static_cast<int64_t>(csr.ids[result->bad_id]);
}

template <typename U>
Status CopyScalarToHost(const U* device_ptr, U* host_value, cudaStream_t stream) {
  DE_RETURN_IF_CUDA_ERROR(
      cudaMemcpyAsync(host_value, device_ptr, sizeof(U), cudaMemcpyDeviceToHost, stream),
      "cudaMemcpyAsync");
  DE_RETURN_IF_CUDA_ERROR(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
  return Status::Ok();
}

// Runs the validation kernels and turns their findings into the CPU kernels' error messages, in
// the CPU's order (start, decreasing, end, ids): one copy back and one synchronization.
template <typename IdT, typename OffsetT>
Status ValidateCsrOnDevice(const CsrIds<IdT, OffsetT>& csr, int64_t num_rows,
                           BoundsCheck bounds_check, ValidationResult* result,
                           cudaStream_t stream) {
  if (csr.nnz > static_cast<int64_t>(std::numeric_limits<OffsetT>::max())) {
    return NnzTooLargeError(csr.nnz, std::numeric_limits<OffsetT>::max());
  }
  DE_RETURN_IF_CUDA_ERROR(cudaMemsetAsync(result, 0xff, sizeof(ValidationResult), stream),
                          "cudaMemsetAsync");
  const int threads = 256;
  ValidateCsrKernel<<<Blocks(std::max(csr.batch, csr.nnz), threads), threads, 0, stream>>>(
      csr, num_rows, bounds_check == BoundsCheck::kError, result);
  DE_RETURN_IF_CUDA_ERROR(cudaGetLastError(), "ValidateCsrKernel launch");
  GatherCsrErrorValues<<<1, 1, 0, stream>>>(csr, result);
  DE_RETURN_IF_CUDA_ERROR(cudaGetLastError(), "GatherCsrErrorValues launch");
  ValidationResult host;
  DE_RETURN_IF_ERROR(CopyScalarToHost(result, &host, stream));
  if (host.first_split != 0) return RowSplitsStartError(host.first_split);
  if (host.bad_split != kNoError) {
    return RowSplitsDecreasingError(static_cast<int64_t>(host.bad_split), host.split_value,
                                    host.split_next);
  }
  if (host.last_split != csr.nnz) return RowSplitsEndError(csr.batch, host.last_split, csr.nnz);
  if (host.bad_id != kNoError) {
    return IdOutOfRangeError(static_cast<int64_t>(host.bad_id), host.id_value, num_rows);
  }
  return Status::Ok();
}

// What bag b's sum is divided by (embedding_lookup.h), in the accumulator type T: 1 when it is not
// divided; for weighted bags 0 when the bag gives zeros. Unweighted, a mean or sqrtn of 0 or 1
// valid ids is not divided.
template <typename T, typename W, typename IdT, typename OffsetT>
__device__ T BagDivisorOnDevice(const CsrIds<IdT, OffsetT>& csr, int64_t num_rows, const W* weights,
                                Combiner combiner, int64_t b) {
  if (combiner == Combiner::kSum) return T(1);
  const bool sqrtn = combiner == Combiner::kSqrtn;
  const int64_t begin = csr.row_splits[b];
  const int64_t end = csr.row_splits[b + 1];
  if (weights == nullptr) {
    int64_t valid = 0;
    for (int64_t j = begin; j < end; ++j) valid += InRange(csr.ids[j], num_rows);
    return MeanDivides(valid) ? BagDivisor<T>(valid, sqrtn) : T(1);
  }
  T total = T(0);
  for (int64_t j = begin; j < end; ++j) {
    if (!InRange(csr.ids[j], num_rows)) continue;
    const T weight = Widen(weights[j]);
    total += sqrtn ? weight * weight : weight;
  }
  if (sqrtn) total = sqrt(total);
  return WeightedDivides(total) ? total : T(0);
}

// A warp per bag; lane w accumulates columns w, w + 32, ... in id order, in the table type's
// accumulator type (float for half tables). `weights` (one per id) is null for unweighted bags.
template <typename T, typename OutT, typename IdT, typename OffsetT>
__global__ void ForwardKernel(const T* __restrict__ params, int64_t num_rows, int64_t width,
                              CsrIds<IdT, OffsetT> csr, const OutT* __restrict__ weights,
                              Combiner combiner, OutT* __restrict__ output) {
  using Acc = AccumulatorOf<T>;
  const int lane = threadIdx.x;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.y) + threadIdx.y; b < csr.batch;
       b += warps) {
    const int64_t begin = csr.row_splits[b];
    const int64_t end = csr.row_splits[b + 1];
    const Acc divisor = BagDivisorOnDevice<Acc>(csr, num_rows, weights, combiner, b);
    for (int64_t w = lane; w < width; w += kWarp) {
      Acc sum = Acc(0);
      for (int64_t j = begin; divisor != Acc(0) && j < end; ++j) {
        const IdT id = csr.ids[j];
        if (!InRange(id, num_rows)) continue;
        const Acc value = Widen(params[static_cast<int64_t>(id) * width + w]);
        sum += weights == nullptr ? value : Widen(weights[j]) * value;
      }
      Store(combiner == Combiner::kSum || divisor == Acc(0) ? sum : sum / divisor,
            &output[b * width + w]);
    }
  }
}

// Ids are sorted as unsigned keys of their width (valid ids are non-negative, so the order is
// the same). An invalid id (kSkip) becomes `sentinel`, which sorts after every valid id.
template <typename IdT>
using SortKey = typename std::make_unsigned<IdT>::type;

template <typename IdT>
struct SortPlan {
  SortKey<IdT> sentinel;
  int end_bit;  // bits the radix sort looks at
};

// The sentinel is num_rows when it fits IdT, so the sort can stop at EndBit(num_rows). Otherwise
// (int32 ids, num_rows >= 2**31: every non-negative id is valid) it is the all-ones key, and the
// sort looks at every bit of the key, never more.
template <typename IdT>
SortPlan<IdT> PlanSort(int64_t num_rows) {
  if (num_rows <= static_cast<int64_t>(std::numeric_limits<IdT>::max())) {
    return {static_cast<SortKey<IdT>>(num_rows), EndBit(num_rows)};
  }
  return {std::numeric_limits<SortKey<IdT>>::max(), static_cast<int>(8 * sizeof(IdT))};
}

template <typename IdT>
__global__ void PrepareSortKernel(const IdT* ids, int64_t nnz, int64_t num_rows,
                                  SortKey<IdT> sentinel, SortKey<IdT>* keys, int64_t* positions) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < nnz;
       j += stride) {
    keys[j] = InRange(ids[j], num_rows) ? static_cast<SortKey<IdT>>(ids[j]) : sentinel;
    positions[j] = j;
  }
}

// Writes each position's bag and each bag's divisor (BagDivisorOnDevice), in the accumulator type
// T.
template <typename T, typename W, typename IdT, typename OffsetT>
__global__ void BagsKernel(CsrIds<IdT, OffsetT> csr, int64_t num_rows, const W* weights,
                           Combiner combiner, int64_t* bag_of, T* divisor) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; b < csr.batch;
       b += stride) {
    for (int64_t j = csr.row_splits[b]; j < static_cast<int64_t>(csr.row_splits[b + 1]); ++j) {
      bag_of[j] = b;
    }
    divisor[b] = BagDivisorOnDevice<T>(csr, num_rows, weights, combiner, b);
  }
}

// A warp per unique id: sums grad_output rows of the bags its occurrences belong to, each divided
// by its bag's divisor (the CPU kernel's order: divide, then weigh), in the accumulator type of the
// table type T, and stores the sum as a T.
template <typename T, typename GradT>
__global__ void AccumulateKernel(
    const GradT* __restrict__ grad_output, int64_t width,
    const int64_t* __restrict__ sorted_positions, const int64_t* __restrict__ run_starts,
    const int* __restrict__ run_lengths, const int64_t* __restrict__ num_unique,
    const int64_t* __restrict__ bag_of, const AccumulatorOf<T>* __restrict__ divisor,
    const GradT* __restrict__ weights, bool divide, T* __restrict__ unique_grad) {
  using Acc = AccumulatorOf<T>;
  const int lane = threadIdx.x;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t u = blockIdx.x * static_cast<int64_t>(blockDim.y) + threadIdx.y; u < *num_unique;
       u += warps) {
    const int64_t begin = run_starts[u];
    const int64_t end = begin + run_lengths[u];
    for (int64_t w = lane; w < width; w += kWarp) {
      Acc sum = Acc(0);
      for (int64_t k = begin; k < end; ++k) {
        const int64_t j = sorted_positions[k];
        const int64_t b = bag_of[j];
        Acc g = Widen(grad_output[b * width + w]);
        if (divide) g = divisor[b] == Acc(0) ? Acc(0) : g / divisor[b];
        sum += weights == nullptr ? g : Widen(weights[j]) * g;
      }
      Store(sum, &unique_grad[u * width + w]);
    }
  }
}

// Number of runs that are real ids: a trailing run of the invalid-id sentinel is dropped.
template <typename Key>
__global__ void CountUniqueKernel(const Key* run_keys, const int* num_runs, Key sentinel,
                                  int64_t* num_unique) {
  int64_t n = *num_runs;
  if (n > 0 && run_keys[n - 1] == sentinel) --n;
  *num_unique = n;
}

__global__ void ValidateCooKernel(const int64_t* indices, int64_t nnz, int64_t num_rows,
                                  int64_t num_cols, ValidationResult* result) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < nnz;
       j += stride) {
    const int64_t row = indices[2 * j], col = indices[2 * j + 1];
    bool bad = !CooInBounds(row, col, num_rows, num_cols);
    if (j > 0) bad = bad || !CooFollows(indices[2 * j - 2], indices[2 * j - 1], row, col);
    if (bad) atomicMin(&result->bad_coo, static_cast<unsigned long long>(j));
  }
}

// row_splits[r] = first position whose row is >= r (rows are validated as sorted).
template <typename OffsetT>
__global__ void CooSplitsKernel(const int64_t* indices, int64_t nnz, int64_t num_rows,
                                OffsetT* row_splits) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; r <= num_rows;
       r += stride) {
    int64_t lo = 0, hi = nnz;
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (indices[2 * mid] < r) {
        lo = mid + 1;
      } else {
        hi = mid;
      }
    }
    row_splits[r] = static_cast<OffsetT>(lo);
  }
}

// Scratch layout of the backward pass for a table of type T; with a null base it only measures.
template <typename T, typename IdT>
struct BackwardScratch {
  using Acc = AccumulatorOf<T>;
  using Key = SortKey<IdT>;
  ValidationResult* validation;
  Key* keys_in;
  Key* keys_out;
  int64_t* positions_in;
  int64_t* positions_out;
  Key* run_keys;
  int* run_lengths;
  int* num_runs;
  int64_t* run_starts;
  int64_t* num_unique;
  int64_t* bag_of;
  Acc* divisor;
  void* cub_temp;
  size_t cub_temp_bytes;
  size_t total_bytes;

  BackwardScratch(void* base, size_t bytes, int64_t nnz, int64_t batch) {
    const int n = static_cast<int>(nnz);
    size_t sort_bytes = 0, rle_bytes = 0, scan_bytes = 0;
    cub::DeviceRadixSort::SortPairs(
        nullptr, sort_bytes, static_cast<const Key*>(nullptr), static_cast<Key*>(nullptr),
        static_cast<const int64_t*>(nullptr), static_cast<int64_t*>(nullptr), n);
    cub::DeviceRunLengthEncode::Encode(nullptr, rle_bytes, static_cast<const Key*>(nullptr),
                                       static_cast<Key*>(nullptr), static_cast<int*>(nullptr),
                                       static_cast<int*>(nullptr), n);
    cub::DeviceScan::ExclusiveSum(nullptr, scan_bytes, static_cast<const int*>(nullptr),
                                  static_cast<int64_t*>(nullptr), n);
    cub_temp_bytes = std::max({sort_bytes, rle_bytes, scan_bytes, size_t{1}});
    Carver carver(base);
    validation = carver.Take<ValidationResult>(1);
    keys_in = carver.Take<Key>(nnz);
    keys_out = carver.Take<Key>(nnz);
    positions_in = carver.Take<int64_t>(nnz);
    positions_out = carver.Take<int64_t>(nnz);
    run_keys = carver.Take<Key>(nnz);
    run_lengths = carver.Take<int>(nnz);
    num_runs = carver.Take<int>(1);
    run_starts = carver.Take<int64_t>(nnz);
    num_unique = carver.Take<int64_t>(1);
    bag_of = carver.Take<int64_t>(nnz);
    divisor = carver.Take<Acc>(batch);
    cub_temp = carver.Take<char>(cub_temp_bytes);
    total_bytes = reinterpret_cast<char*>(carver.Take<char>(0)) - static_cast<char*>(base);
  }
};

}  // namespace

size_t ValidationWorkspaceBytes() { return AlignUp(sizeof(ValidationResult)); }

bool CudaDeviceAvailable() {
  int count = 0;
  return cudaGetDeviceCount(&count) == cudaSuccess && count > 0;
}

template <typename T, typename IdT, typename OffsetT>
size_t PooledLookupBackwardCudaWorkspaceBytes(int64_t nnz, int64_t batch) {
  return BackwardScratch<T, IdT>(nullptr, 0, nnz, batch).total_bytes;
}

namespace {

// The forward and backward passes; `weights` is null for unweighted bags.
template <typename T, typename OutT, typename IdT, typename OffsetT>
Status ForwardCuda(const T* params, int64_t num_rows, int64_t width,
                   const CsrIds<IdT, OffsetT>& csr, const OutT* weights, Combiner combiner,
                   BoundsCheck bounds_check, OutT* output, void* workspace, size_t workspace_bytes,
                   cudaStream_t stream) {
  if (workspace_bytes < ValidationWorkspaceBytes()) {
    return Status::Internal("PooledLookupForwardCuda: workspace too small");
  }
  auto* validation = static_cast<ValidationResult*>(workspace);
  DE_RETURN_IF_ERROR(ValidateCsrOnDevice(csr, num_rows, bounds_check, validation, stream));
  if (csr.batch == 0 || width == 0) return Status::Ok();
  const dim3 block(kWarp, kWarpsPerBlock);
  ForwardKernel<<<Blocks(csr.batch, kWarpsPerBlock), block, 0, stream>>>(
      params, num_rows, width, csr, weights, combiner, output);
  DE_RETURN_IF_CUDA_ERROR(cudaGetLastError(), "ForwardKernel launch");
  return Status::Ok();
}

template <typename T, typename GradT, typename IdT, typename OffsetT>
Status BackwardCuda(const GradT* grad_output, int64_t num_rows, int64_t width,
                    const CsrIds<IdT, OffsetT>& csr, const GradT* weights, Combiner combiner,
                    BoundsCheck bounds_check, IdT* unique_ids, T* unique_grad, int64_t* num_unique,
                    void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (csr.nnz > INT_MAX) {
    return NnzTooLargeError(csr.nnz, INT_MAX);
  }
  BackwardScratch<T, IdT> s(workspace, workspace_bytes, csr.nnz, csr.batch);
  if (s.total_bytes > workspace_bytes) {
    return Status::Internal("PooledLookupBackwardCuda: workspace too small");
  }
  DE_RETURN_IF_ERROR(ValidateCsrOnDevice(csr, num_rows, bounds_check, s.validation, stream));
  *num_unique = 0;
  if (csr.nnz == 0) return Status::Ok();
  const int n = static_cast<int>(csr.nnz);
  const int threads = 256;

  const SortPlan<IdT> plan = PlanSort<IdT>(num_rows);
  PrepareSortKernel<<<Blocks(csr.nnz, threads), threads, 0, stream>>>(
      csr.ids, csr.nnz, num_rows, plan.sentinel, s.keys_in, s.positions_in);
  DE_RETURN_IF_CUDA_ERROR(cudaGetLastError(), "PrepareSortKernel launch");
  size_t temp_bytes = s.cub_temp_bytes;
  DE_RETURN_IF_CUDA_ERROR(
      cub::DeviceRadixSort::SortPairs(s.cub_temp, temp_bytes, s.keys_in, s.keys_out, s.positions_in,
                                      s.positions_out, n, 0, plan.end_bit, stream),
      "DeviceRadixSort::SortPairs");
  temp_bytes = s.cub_temp_bytes;
  DE_RETURN_IF_CUDA_ERROR(
      cub::DeviceRunLengthEncode::Encode(s.cub_temp, temp_bytes, s.keys_out, s.run_keys,
                                         s.run_lengths, s.num_runs, n, stream),
      "DeviceRunLengthEncode::Encode");
  temp_bytes = s.cub_temp_bytes;
  DE_RETURN_IF_CUDA_ERROR(
      cub::DeviceScan::ExclusiveSum(s.cub_temp, temp_bytes, s.run_lengths, s.run_starts, n, stream),
      "DeviceScan::ExclusiveSum");
  CountUniqueKernel<<<1, 1, 0, stream>>>(s.run_keys, s.num_runs, plan.sentinel, s.num_unique);
  DE_RETURN_IF_CUDA_ERROR(cudaGetLastError(), "CountUniqueKernel launch");
  if (csr.batch > 0) {
    BagsKernel<<<Blocks(csr.batch, threads), threads, 0, stream>>>(csr, num_rows, weights, combiner,
                                                                   s.bag_of, s.divisor);
    DE_RETURN_IF_CUDA_ERROR(cudaGetLastError(), "BagsKernel launch");
  }
  DE_RETURN_IF_ERROR(CopyScalarToHost(s.num_unique, num_unique, stream));
  if (*num_unique == 0) return Status::Ok();
  DE_RETURN_IF_CUDA_ERROR(cudaMemcpyAsync(unique_ids, s.run_keys, *num_unique * sizeof(IdT),
                                          cudaMemcpyDeviceToDevice, stream),
                          "cudaMemcpyAsync");
  if (width > 0) {
    const dim3 block(kWarp, kWarpsPerBlock);
    AccumulateKernel<T, GradT><<<Blocks(*num_unique, kWarpsPerBlock), block, 0, stream>>>(
        grad_output, width, s.positions_out, s.run_starts, s.run_lengths, s.num_unique, s.bag_of,
        s.divisor, weights, combiner != Combiner::kSum, unique_grad);
    DE_RETURN_IF_CUDA_ERROR(cudaGetLastError(), "AccumulateKernel launch");
  }
  return Status::Ok();
}

}  // namespace

template <typename T, typename IdT, typename OffsetT>
Status PooledLookupForwardCuda(const T* params, int64_t num_rows, int64_t width,
                               const CsrIds<IdT, OffsetT>& csr, Combiner combiner,
                               BoundsCheck bounds_check, T* output, void* workspace,
                               size_t workspace_bytes, cudaStream_t stream) {
  return ForwardCuda<T, T>(params, num_rows, width, csr, nullptr, combiner, bounds_check, output,
                           workspace, workspace_bytes, stream);
}

template <typename T, typename IdT, typename OffsetT>
Status WeightedPooledLookupForwardCuda(const T* params, int64_t num_rows, int64_t width,
                                       const CsrIds<IdT, OffsetT>& csr, const T* weights,
                                       Combiner combiner, BoundsCheck bounds_check, T* output,
                                       void* workspace, size_t workspace_bytes,
                                       cudaStream_t stream) {
  return ForwardCuda(params, num_rows, width, csr, weights, combiner, bounds_check, output,
                     workspace, workspace_bytes, stream);
}

template <typename T, typename IdT, typename OffsetT>
Status PooledLookupBackwardCuda(const T* grad_output, int64_t num_rows, int64_t width,
                                const CsrIds<IdT, OffsetT>& csr, Combiner combiner,
                                BoundsCheck bounds_check, IdT* unique_ids, T* unique_grad,
                                int64_t* num_unique, void* workspace, size_t workspace_bytes,
                                cudaStream_t stream) {
  return BackwardCuda<T, T>(grad_output, num_rows, width, csr, nullptr, combiner, bounds_check,
                            unique_ids, unique_grad, num_unique, workspace, workspace_bytes,
                            stream);
}

template <typename T, typename IdT, typename OffsetT>
Status WeightedPooledLookupBackwardCuda(const T* grad_output, int64_t num_rows, int64_t width,
                                        const CsrIds<IdT, OffsetT>& csr, const T* weights,
                                        Combiner combiner, BoundsCheck bounds_check,
                                        IdT* unique_ids, T* unique_grad, int64_t* num_unique,
                                        void* workspace, size_t workspace_bytes,
                                        cudaStream_t stream) {
  return BackwardCuda(grad_output, num_rows, width, csr, weights, combiner, bounds_check,
                      unique_ids, unique_grad, num_unique, workspace, workspace_bytes, stream);
}

template <typename T, typename OutT, typename IdT, typename OffsetT>
Status HalfPooledLookupForwardCuda(const T* params, int64_t num_rows, int64_t width,
                                   const CsrIds<IdT, OffsetT>& csr, const OutT* weights,
                                   Combiner combiner, BoundsCheck bounds_check, OutT* output,
                                   void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  static_assert(kIsHalf<T>, "HalfPooledLookupForwardCuda reads Float16 or BFloat16 tables");
  return ForwardCuda(params, num_rows, width, csr, weights, combiner, bounds_check, output,
                     workspace, workspace_bytes, stream);
}

template <typename T, typename GradT, typename IdT, typename OffsetT>
Status HalfPooledLookupBackwardCuda(const GradT* grad_output, int64_t num_rows, int64_t width,
                                    const CsrIds<IdT, OffsetT>& csr, const GradT* weights,
                                    Combiner combiner, BoundsCheck bounds_check, IdT* unique_ids,
                                    T* unique_grad, int64_t* num_unique, void* workspace,
                                    size_t workspace_bytes, cudaStream_t stream) {
  static_assert(kIsHalf<T>, "HalfPooledLookupBackwardCuda writes Float16 or BFloat16 gradients");
  return BackwardCuda(grad_output, num_rows, width, csr, weights, combiner, bounds_check,
                      unique_ids, unique_grad, num_unique, workspace, workspace_bytes, stream);
}

template <typename OffsetT>
Status CooToRowSplitsCuda(const int64_t* indices, int64_t nnz, int64_t num_rows_dense,
                          int64_t num_cols_dense, OffsetT* row_splits, void* workspace,
                          size_t workspace_bytes, cudaStream_t stream) {
  if (nnz > static_cast<int64_t>(std::numeric_limits<OffsetT>::max())) {
    return NnzTooLargeError(nnz, std::numeric_limits<OffsetT>::max());
  }
  if (workspace_bytes < ValidationWorkspaceBytes()) {
    return Status::Internal("CooToRowSplitsCuda: workspace too small");
  }
  auto* result = static_cast<ValidationResult*>(workspace);
  const int threads = 256;
  if (nnz > 0) {
    DE_RETURN_IF_CUDA_ERROR(cudaMemsetAsync(result, 0xff, sizeof(ValidationResult), stream),
                            "cudaMemsetAsync");
    ValidateCooKernel<<<Blocks(nnz, threads), threads, 0, stream>>>(indices, nnz, num_rows_dense,
                                                                    num_cols_dense, result);
    DE_RETURN_IF_CUDA_ERROR(cudaGetLastError(), "ValidateCooKernel launch");
    ValidationResult host;
    DE_RETURN_IF_ERROR(CopyScalarToHost(result, &host, stream));
    if (host.bad_coo != kNoError) {
      const int64_t j = static_cast<int64_t>(host.bad_coo);
      int64_t index[4] = {0, 0, 0, 0};  // previous (row, col), then this (row, col)
      const int64_t first = j > 0 ? 2 * j - 2 : 2 * j;
      DE_RETURN_IF_CUDA_ERROR(
          cudaMemcpyAsync(index, indices + first,
                          4 * sizeof(int64_t) - (j > 0 ? 0 : 2 * sizeof(int64_t)),
                          cudaMemcpyDeviceToHost, stream),
          "cudaMemcpyAsync");
      DE_RETURN_IF_CUDA_ERROR(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
      const int64_t* here = j > 0 ? index + 2 : index;
      if (!CooInBounds(here[0], here[1], num_rows_dense, num_cols_dense)) {
        return CooIndexOutOfBoundsError(j, here[0], here[1], num_rows_dense, num_cols_dense);
      }
      return CooIndexOrderError(j, here[0], here[1], index[0], index[1]);
    }
  }
  CooSplitsKernel<<<Blocks(num_rows_dense + 1, threads), threads, 0, stream>>>(
      indices, nnz, num_rows_dense, row_splits);
  DE_RETURN_IF_CUDA_ERROR(cudaGetLastError(), "CooSplitsKernel launch");
  return Status::Ok();
}

#define DE_INSTANTIATE_CUDA_LOOKUP(T, IdT, OffsetT)                                                \
  template size_t PooledLookupBackwardCudaWorkspaceBytes<T, IdT, OffsetT>(int64_t, int64_t);       \
  template Status PooledLookupForwardCuda(const T*, int64_t, int64_t, const CsrIds<IdT, OffsetT>&, \
                                          Combiner, BoundsCheck, T*, void*, size_t, cudaStream_t); \
  template Status PooledLookupBackwardCuda(const T*, int64_t, int64_t,                             \
                                           const CsrIds<IdT, OffsetT>&, Combiner, BoundsCheck,     \
                                           IdT*, T*, int64_t*, void*, size_t, cudaStream_t);       \
  template Status WeightedPooledLookupForwardCuda(const T*, int64_t, int64_t,                      \
                                                  const CsrIds<IdT, OffsetT>&, const T*, Combiner, \
                                                  BoundsCheck, T*, void*, size_t, cudaStream_t);   \
  template Status WeightedPooledLookupBackwardCuda(                                                \
      const T*, int64_t, int64_t, const CsrIds<IdT, OffsetT>&, const T*, Combiner, BoundsCheck,    \
      IdT*, T*, int64_t*, void*, size_t, cudaStream_t);

DE_INSTANTIATE_CUDA_LOOKUP(float, int32_t, int32_t)
DE_INSTANTIATE_CUDA_LOOKUP(float, int32_t, int64_t)
DE_INSTANTIATE_CUDA_LOOKUP(float, int64_t, int32_t)
DE_INSTANTIATE_CUDA_LOOKUP(float, int64_t, int64_t)
DE_INSTANTIATE_CUDA_LOOKUP(double, int32_t, int32_t)
DE_INSTANTIATE_CUDA_LOOKUP(double, int32_t, int64_t)
DE_INSTANTIATE_CUDA_LOOKUP(double, int64_t, int32_t)
DE_INSTANTIATE_CUDA_LOOKUP(double, int64_t, int64_t)
#define DE_INSTANTIATE_HALF_CUDA_LOOKUP(T, OutT, IdT, OffsetT)                                    \
  template Status HalfPooledLookupForwardCuda(const T*, int64_t, int64_t,                         \
                                              const CsrIds<IdT, OffsetT>&, const OutT*, Combiner, \
                                              BoundsCheck, OutT*, void*, size_t, cudaStream_t);   \
  template Status HalfPooledLookupBackwardCuda(                                                   \
      const OutT*, int64_t, int64_t, const CsrIds<IdT, OffsetT>&, const OutT*, Combiner,          \
      BoundsCheck, IdT*, T*, int64_t*, void*, size_t, cudaStream_t);

#define DE_INSTANTIATE_HALF_CUDA_LOOKUP_IDS(T)                                                   \
  template size_t PooledLookupBackwardCudaWorkspaceBytes<T, int32_t, int32_t>(int64_t, int64_t); \
  template size_t PooledLookupBackwardCudaWorkspaceBytes<T, int32_t, int64_t>(int64_t, int64_t); \
  template size_t PooledLookupBackwardCudaWorkspaceBytes<T, int64_t, int32_t>(int64_t, int64_t); \
  template size_t PooledLookupBackwardCudaWorkspaceBytes<T, int64_t, int64_t>(int64_t, int64_t); \
  DE_INSTANTIATE_HALF_CUDA_LOOKUP(T, T, int32_t, int32_t)                                        \
  DE_INSTANTIATE_HALF_CUDA_LOOKUP(T, T, int32_t, int64_t)                                        \
  DE_INSTANTIATE_HALF_CUDA_LOOKUP(T, T, int64_t, int32_t)                                        \
  DE_INSTANTIATE_HALF_CUDA_LOOKUP(T, T, int64_t, int64_t)                                        \
  DE_INSTANTIATE_HALF_CUDA_LOOKUP(T, float, int32_t, int32_t)                                    \
  DE_INSTANTIATE_HALF_CUDA_LOOKUP(T, float, int32_t, int64_t)                                    \
  DE_INSTANTIATE_HALF_CUDA_LOOKUP(T, float, int64_t, int32_t)                                    \
  DE_INSTANTIATE_HALF_CUDA_LOOKUP(T, float, int64_t, int64_t)

DE_INSTANTIATE_HALF_CUDA_LOOKUP_IDS(Float16)
DE_INSTANTIATE_HALF_CUDA_LOOKUP_IDS(BFloat16)
template Status CooToRowSplitsCuda(const int64_t*, int64_t, int64_t, int64_t, int32_t*, void*,
                                   size_t, cudaStream_t);
template Status CooToRowSplitsCuda(const int64_t*, int64_t, int64_t, int64_t, int64_t*, void*,
                                   size_t, cudaStream_t);

#undef DE_INSTANTIATE_HALF_CUDA_LOOKUP_IDS
#undef DE_INSTANTIATE_HALF_CUDA_LOOKUP
#undef DE_INSTANTIATE_CUDA_LOOKUP

}  // namespace distributed_embeddings
