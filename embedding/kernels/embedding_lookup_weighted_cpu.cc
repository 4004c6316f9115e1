// Weighted pooled lookups on the CPU (embedding_lookup.h): the forward pass and the table's
// sparse gradient, for float and double tables.
//
// The forward has loops of its own, in the shape of the unweighted ones
// (embedding_lookup_cpu_impl.h): bags split across threads by their number of ids, rows prefetched
// a few ids ahead, a bag's sums in vector registers for the common widths. Each id's row is
// multiplied by its weight before it is added, as TensorFlow's weighted embedding_lookup_sparse
// multiplies and then segment-sums. The backward is the unweighted one (BackwardCpu), given the
// weights.
#include <algorithm>
#include <cstdint>

#include "embedding/kernels/embedding_lookup.h"
#include "embedding/kernels/embedding_lookup_cpu_impl.h"

namespace distributed_embeddings {
namespace {

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

#if DE_HAVE_AVX2_CLONES
// The same loops with 256-bit instructions (no FMA: products and sums stay separate, as above).
template <typename T, typename IdT, typename OffsetT>
__attribute__((target("avx2"))) void WeightedForwardBagsAvx2(
    const T* params, int64_t num_rows, int64_t width, const CsrIds<IdT, OffsetT>& csr,
    const T* weights, Combiner combiner, int64_t bag_begin, int64_t bag_end, T* output) {
  WeightedForwardBagsImpl(params, num_rows, width, csr, weights, combiner, bag_begin, bag_end,
                          output);
}
#endif

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
  return BackwardCpu(grad_output, num_rows, width, csr, weights, combiner, bounds_check, unique_ids,
                     unique_grad, num_unique, parallel_for);
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
