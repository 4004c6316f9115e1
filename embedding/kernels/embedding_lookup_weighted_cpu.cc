// Weighted pooled lookups on the CPU (embedding_lookup.h): the forward pass and the table's
// sparse gradient, for float and double tables.
//
// The same shape as the unweighted kernels (embedding_lookup_cpu_impl.h), whose id checks, unique
// id maps and load balancing they share: bags split across threads by their number of ids, rows
// prefetched a few ids ahead, unique ids from one serial pass, then their gradient rows summed in
// parallel in occurrence order (deterministic). Each id's row is multiplied by its weight before it
// is added, as TensorFlow's weighted embedding_lookup_sparse multiplies and then segment-sums.
#include <cmath>
#include <cstdint>
#include <new>
#include <string>
#include <vector>

#include "embedding/kernels/embedding_lookup.h"
#include "embedding/kernels/embedding_lookup_cpu_impl.h"

namespace distributed_embeddings {
namespace {

// What bag b's weighted sum is divided by: 1 for sum; the sum of its valid ids' weights for mean,
// the square root of the sum of their squares for sqrtn; 0 when that is zero (the bag gives zeros).
template <typename T, typename IdT, typename OffsetT>
T WeightedBagDivisor(const CsrIds<IdT, OffsetT>& csr, const T* weights, int64_t num_rows,
                     Combiner combiner, int64_t b) {
  if (combiner == Combiner::kSum) return T(1);
  T total = T(0);
  for (int64_t j = csr.row_splits[b]; j < static_cast<int64_t>(csr.row_splits[b + 1]); ++j) {
    if (!InRange(csr.ids[j], num_rows)) continue;
    total += combiner == Combiner::kMean ? weights[j] : weights[j] * weights[j];
  }
  if (combiner == Combiner::kSqrtn) total = std::sqrt(total);
  return WeightedDivides(total) ? total : T(0);
}

// Prefetches the row of the id kPrefetchDistance positions after j, if it is a valid id before
// `range_end` (the end of this thread's ids).
template <typename T, typename IdT, typename OffsetT>
__attribute__((always_inline)) inline void PrefetchAhead(const T* params, int64_t num_rows,
                                                         int64_t width,
                                                         const CsrIds<IdT, OffsetT>& csr, int64_t j,
                                                         int64_t range_end) {
  if (j + kPrefetchDistance >= range_end) return;
  const IdT ahead = csr.ids[j + kPrefetchDistance];
  if (InRange(ahead, num_rows)) {
    PrefetchRow(params + static_cast<int64_t>(ahead) * width,
                width * static_cast<int64_t>(sizeof(T)));
  }
}

// The bags [bag_begin, bag_end) with a compile-time width: a bag's sums stay in vector registers,
// kBlock packets at a time, as in the unweighted kernel (each lane still multiplies, then adds, in
// id order, so the results equal the loop below bit for bit).
template <int64_t kWidth, typename T, typename IdT, typename OffsetT>
__attribute__((always_inline)) inline void WeightedForwardBagsFixedWidth(
    const T* __restrict params, int64_t num_rows, const CsrIds<IdT, OffsetT>& csr,
    const T* __restrict weights, Combiner combiner, int64_t bag_begin, int64_t bag_end,
    T* __restrict output) {
  constexpr int64_t kLanes = kEigenPacketBytes / sizeof(T);
  constexpr int64_t kPackets = kWidth / kLanes;
  static_assert(kPackets * kLanes == kWidth, "fixed widths are whole packets");
  constexpr int64_t kBlock = kPackets < 8 ? kPackets : 8;
  const int64_t range_end = static_cast<int64_t>(csr.row_splits[bag_end]);
  for (int64_t b = bag_begin; b < bag_end; ++b) {
    const int64_t begin = static_cast<int64_t>(csr.row_splits[b]);
    const int64_t end = static_cast<int64_t>(csr.row_splits[b + 1]);
    T* __restrict out = output + b * kWidth;
    const T divisor = WeightedBagDivisor(csr, weights, num_rows, combiner, b);
    const bool zeros = divisor == T(0);
    const bool divide = combiner != Combiner::kSum;
    for (int64_t first = 0; first < kWidth; first += kBlock * kLanes) {
      Packet<T> sum[kBlock];
      DE_UNROLL
      for (int64_t p = 0; p < kBlock; ++p) sum[p] = Packet<T>{};
      for (int64_t j = begin; !zeros && j < end; ++j) {
        if (first == 0) PrefetchAhead(params, num_rows, kWidth, csr, j, range_end);
        const IdT id = csr.ids[j];
        if (!InRange(id, num_rows)) continue;  // Only reachable with BoundsCheck::kSkip.
        const T weight = weights[j];
        const T* row = params + static_cast<int64_t>(id) * kWidth + first;
        DE_UNROLL
        for (int64_t p = 0; p < kBlock; ++p) sum[p] += LoadPacket(row + p * kLanes) * weight;
      }
      DE_UNROLL
      for (int64_t p = 0; p < kBlock; ++p) {
        StorePacket(divide && !zeros ? sum[p] / divisor : sum[p], out + first + p * kLanes);
      }
    }
  }
}

template <typename T, typename IdT, typename OffsetT>
__attribute__((always_inline)) inline void WeightedForwardBagsImpl(
    const T* __restrict params, int64_t num_rows, int64_t width, const CsrIds<IdT, OffsetT>& csr,
    const T* __restrict weights, Combiner combiner, int64_t bag_begin, int64_t bag_end,
    T* __restrict output) {
  switch (width) {
#define DE_WEIGHTED_FIXED_WIDTH(kWidth)                                                    \
  case kWidth:                                                                             \
    return WeightedForwardBagsFixedWidth<kWidth>(params, num_rows, csr, weights, combiner, \
                                                 bag_begin, bag_end, output);
    DE_WEIGHTED_FIXED_WIDTH(16)
    DE_WEIGHTED_FIXED_WIDTH(32)
    DE_WEIGHTED_FIXED_WIDTH(64)
    DE_WEIGHTED_FIXED_WIDTH(128)
    DE_WEIGHTED_FIXED_WIDTH(256)
#undef DE_WEIGHTED_FIXED_WIDTH
    default:
      break;
  }
  const int64_t range_end = static_cast<int64_t>(csr.row_splits[bag_end]);
  for (int64_t b = bag_begin; b < bag_end; ++b) {
    T* __restrict out = output + b * width;
    std::fill(out, out + width, T(0));
    const T divisor = WeightedBagDivisor(csr, weights, num_rows, combiner, b);
    if (divisor == T(0)) continue;
    const int64_t end = static_cast<int64_t>(csr.row_splits[b + 1]);
    for (int64_t j = csr.row_splits[b]; j < end; ++j) {
      PrefetchAhead(params, num_rows, width, csr, j, range_end);
      const IdT id = csr.ids[j];
      if (!InRange(id, num_rows)) continue;  // Only reachable with BoundsCheck::kSkip.
      const T weight = weights[j];
      const T* __restrict row = params + static_cast<int64_t>(id) * width;
      for (int64_t w = 0; w < width; ++w) out[w] += weight * row[w];
    }
    if (combiner != Combiner::kSum) {
      for (int64_t w = 0; w < width; ++w) out[w] /= divisor;
    }
  }
}

template <typename T, typename IdT, typename OffsetT>
void WeightedForwardBagsPortable(const T* params, int64_t num_rows, int64_t width,
                                 const CsrIds<IdT, OffsetT>& csr, const T* weights,
                                 Combiner combiner, int64_t bag_begin, int64_t bag_end, T* output) {
  WeightedForwardBagsImpl(params, num_rows, width, csr, weights, combiner, bag_begin, bag_end,
                          output);
}

// Unique id u's gradient row: the sum over its occurrences k (positions[starts[u]] ..) of the
// occurrence's weight times its bag's row of `source`.
template <typename T>
__attribute__((always_inline)) inline void SumWeightedGradRowsImpl(
    const T* __restrict source, int64_t width, const T* __restrict weights,
    const int64_t* __restrict starts, const int64_t* __restrict positions,
    const int64_t* __restrict bag_of, int64_t u_begin, int64_t u_end, T* __restrict unique_grad) {
  SumOccurrenceRowsAnyWidth<true>(
      source, width, starts, [=](int64_t k) { return bag_of[positions[k]]; },
      [=](int64_t k) { return weights[positions[k]]; }, u_begin, u_end, unique_grad);
}

template <typename T>
void SumWeightedGradRowsPortable(const T* source, int64_t width, const T* weights,
                                 const int64_t* starts, const int64_t* positions,
                                 const int64_t* bag_of, int64_t u_begin, int64_t u_end,
                                 T* unique_grad) {
  SumWeightedGradRowsImpl(source, width, weights, starts, positions, bag_of, u_begin, u_end,
                          unique_grad);
}

#if DE_HAVE_AVX2_CLONES
// The same loops with 256-bit instructions (no FMA: products and sums stay separate, as above).
template <typename T, typename IdT, typename OffsetT>
__attribute__((target("avx2"))) void WeightedForwardBagsAvx2(
    const T* params, int64_t num_rows, int64_t width, const CsrIds<IdT, OffsetT>& csr,
    const T* weights, Combiner combiner, int64_t bag_begin, int64_t bag_end, T* output) {
  WeightedForwardBagsImpl(params, num_rows, width, csr, weights, combiner, bag_begin, bag_end,
                          output);
}

template <typename T>
__attribute__((target("avx2"))) void SumWeightedGradRowsAvx2(const T* source, int64_t width,
                                                             const T* weights,
                                                             const int64_t* starts,
                                                             const int64_t* positions,
                                                             const int64_t* bag_of, int64_t u_begin,
                                                             int64_t u_end, T* unique_grad) {
  SumWeightedGradRowsImpl(source, width, weights, starts, positions, bag_of, u_begin, u_end,
                          unique_grad);
}
#endif

template <typename T, typename IdT, typename OffsetT>
void WeightedBackwardValidated(const T* grad_output, int64_t num_rows, int64_t width,
                               const CsrIds<IdT, OffsetT>& csr, const T* weights, Combiner combiner,
                               IdT* unique_ids, T* unique_grad, int64_t* num_unique,
                               const ParallelFor& parallel_for) {
  *num_unique = 0;
  if (csr.nnz == 0) return;
  std::vector<int64_t> unique_of(csr.nnz);
  IndexUniqueIdsOfCsr(csr, num_rows, unique_of.data(), unique_ids, num_unique);
  const int64_t n_unique = *num_unique;
  if (n_unique == 0) return;  // Every id skipped (BoundsCheck::kSkip).

  // Each bag's output gradient divided by its divisor, once per bag (zeros where the forward gave
  // zeros), and each position's bag.
  const T* source = grad_output;
  std::vector<T> scaled;
  if (combiner != Combiner::kSum) scaled.resize(csr.batch * width);
  std::vector<int64_t> bag_of(csr.nnz);
  for (int64_t b = 0; b < csr.batch; ++b) {
    for (int64_t j = csr.row_splits[b]; j < static_cast<int64_t>(csr.row_splits[b + 1]); ++j) {
      bag_of[j] = b;
    }
    if (combiner == Combiner::kSum) continue;
    const T divisor = WeightedBagDivisor(csr, weights, num_rows, combiner, b);
    for (int64_t w = 0; w < width; ++w) {
      scaled[b * width + w] = divisor == T(0) ? T(0) : grad_output[b * width + w] / divisor;
    }
  }
  if (combiner != Combiner::kSum) source = scaled.data();

  // Counting sort of the valid positions by unique index, in occurrence order within each id.
  std::vector<int64_t> starts(n_unique + 1, 0);
  for (int64_t j = 0; j < csr.nnz; ++j) {
    if (unique_of[j] >= 0) ++starts[unique_of[j] + 1];
  }
  for (int64_t u = 0; u < n_unique; ++u) starts[u + 1] += starts[u];
  std::vector<int64_t> positions(starts[n_unique]);
  {
    std::vector<int64_t> cursor(starts.begin(), starts.end() - 1);
    for (int64_t j = 0; j < csr.nnz; ++j) {
      if (unique_of[j] >= 0) positions[cursor[unique_of[j]]++] = j;
    }
  }

  const int64_t cost_per_occurrence = width * static_cast<int64_t>(sizeof(T));
  const auto sum_grad_rows = [&](int64_t begin, int64_t end) {
#if DE_HAVE_AVX2_CLONES
    if (CpuHasAvx2()) {
      return SumWeightedGradRowsAvx2(source, width, weights, starts.data(), positions.data(),
                                     bag_of.data(), begin, end, unique_grad);
    }
#endif
    SumWeightedGradRowsPortable(source, width, weights, starts.data(), positions.data(),
                                bag_of.data(), begin, end, unique_grad);
  };
  RunParallelBalanced(parallel_for, n_unique, starts.data(), cost_per_occurrence, sum_grad_rows);
}

}  // namespace

template <typename T, typename IdT, typename OffsetT>
Status WeightedPooledLookupForwardCpu(const T* params, int64_t num_rows, int64_t width,
                                      const CsrIds<IdT, OffsetT>& csr, const T* weights,
                                      Combiner combiner, BoundsCheck bounds_check, T* output,
                                      const ParallelFor& parallel_for) {
  DE_RETURN_IF_ERROR(ValidateCsrIds(csr, num_rows, bounds_check));
  if (width == 0) return Status::Ok();
  const int64_t cost_per_id = width * static_cast<int64_t>(sizeof(T));
  const auto forward_bags = [&](int64_t begin, int64_t end) {
#if DE_HAVE_AVX2_CLONES
    if (CpuHasAvx2()) {
      return WeightedForwardBagsAvx2(params, num_rows, width, csr, weights, combiner, begin, end,
                                     output);
    }
#endif
    WeightedForwardBagsPortable(params, num_rows, width, csr, weights, combiner, begin, end,
                                output);
  };
  RunParallelBalanced(parallel_for, csr.batch, csr.row_splits, cost_per_id, forward_bags);
  return Status::Ok();
}

template <typename T, typename IdT, typename OffsetT>
Status WeightedPooledLookupBackwardCpu(const T* grad_output, int64_t num_rows, int64_t width,
                                       const CsrIds<IdT, OffsetT>& csr, const T* weights,
                                       Combiner combiner, BoundsCheck bounds_check, IdT* unique_ids,
                                       T* unique_grad, int64_t* num_unique,
                                       const ParallelFor& parallel_for) {
  DE_RETURN_IF_ERROR(ValidateCsrIds(csr, num_rows, bounds_check));
  try {
    WeightedBackwardValidated(grad_output, num_rows, width, csr, weights, combiner, unique_ids,
                              unique_grad, num_unique, parallel_for);
  } catch (const std::bad_alloc&) {
    *num_unique = 0;
    return Status::ResourceExhausted("out of memory for the backward pass's scratch buffers (" +
                                     std::to_string(csr.nnz) + " ids).");
  }
  return Status::Ok();
}

#define DE_INSTANTIATE_WEIGHTED_CPU_LOOKUP(T, IdT, OffsetT)                                       \
  template Status WeightedPooledLookupForwardCpu(const T*, int64_t, int64_t,                      \
                                                 const CsrIds<IdT, OffsetT>&, const T*, Combiner, \
                                                 BoundsCheck, T*, const ParallelFor&);            \
  template Status WeightedPooledLookupBackwardCpu(                                                \
      const T*, int64_t, int64_t, const CsrIds<IdT, OffsetT>&, const T*, Combiner, BoundsCheck,   \
      IdT*, T*, int64_t*, const ParallelFor&);

DE_INSTANTIATE_WEIGHTED_CPU_LOOKUP(float, int32_t, int32_t)
DE_INSTANTIATE_WEIGHTED_CPU_LOOKUP(float, int32_t, int64_t)
DE_INSTANTIATE_WEIGHTED_CPU_LOOKUP(float, int64_t, int32_t)
DE_INSTANTIATE_WEIGHTED_CPU_LOOKUP(float, int64_t, int64_t)
DE_INSTANTIATE_WEIGHTED_CPU_LOOKUP(double, int32_t, int32_t)
DE_INSTANTIATE_WEIGHTED_CPU_LOOKUP(double, int32_t, int64_t)
DE_INSTANTIATE_WEIGHTED_CPU_LOOKUP(double, int64_t, int32_t)
DE_INSTANTIATE_WEIGHTED_CPU_LOOKUP(double, int64_t, int64_t)

#undef DE_INSTANTIATE_WEIGHTED_CPU_LOOKUP

}  // namespace distributed_embeddings
