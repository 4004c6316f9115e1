// Pooled lookups of half-precision tables on the CPU (embedding_lookup.h, half.h).
//
// The forward reads the table in its own type, half the bytes of a float table, which is what a
// memory-bound lookup pays for: rows are widened to float as they are added (exactly), a bag's
// sums stay in float, and each output value is rounded once. Bags are split across threads by
// their number of ids and rows are prefetched a few ids ahead, as in the float kernels; for the
// common widths the width is a compile-time constant, so the sums live in vector registers.
// The backward is the float one (BackwardValidated) on the widened output gradient, with each
// unique row rounded once to the table's type at the end.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <new>
#include <string>
#include <type_traits>
#include <vector>

#include "embedding/kernels/embedding_lookup.h"
#include "embedding/kernels/embedding_lookup_cpu_impl.h"
#include "embedding/kernels/half.h"

namespace distributed_embeddings {
namespace {

// What bag b's float sum is divided by (embedding_lookup.h): 1 when it is not divided; 0 when a
// weighted bag gives zeros.
template <typename OutT, typename IdT, typename OffsetT>
__attribute__((always_inline)) inline float HalfBagDivisor(const CsrIds<IdT, OffsetT>& csr,
                                                           int64_t num_rows, const OutT* weights,
                                                           Combiner combiner, int64_t b) {
  if (combiner == Combiner::kSum) return 1.0f;
  const bool sqrtn = combiner == Combiner::kSqrtn;
  const int64_t begin = static_cast<int64_t>(csr.row_splits[b]);
  const int64_t end = static_cast<int64_t>(csr.row_splits[b + 1]);
  if (weights == nullptr) {
    int64_t valid = 0;
    for (int64_t j = begin; j < end; ++j) valid += InRange(csr.ids[j], num_rows);
    return MeanDivides(valid) ? BagDivisor<float>(valid, sqrtn) : 1.0f;
  }
  float total = 0.0f;
  for (int64_t j = begin; j < end; ++j) {
    if (!InRange(csr.ids[j], num_rows)) continue;
    const float weight = Widen(weights[j]);
    total += sqrtn ? weight * weight : weight;
  }
  if (sqrtn) total = std::sqrt(total);
  return WeightedDivides(total) ? total : 0.0f;
}

// The bags [bag_begin, bag_end): each valid id's row widened (and, kWeighted, multiplied by its
// weight, then added) into float sums in id order. kWidth is the width when it is a compile-time
// constant, 0 otherwise; `sums` has room for a row.
template <int64_t kWidth, bool kWeighted, typename T, typename OutT, typename IdT, typename OffsetT>
__attribute__((always_inline)) inline void HalfForwardBagsImpl(
    const T* __restrict params, int64_t num_rows, int64_t dynamic_width,
    const CsrIds<IdT, OffsetT>& csr, const OutT* __restrict weights, Combiner combiner,
    int64_t bag_begin, int64_t bag_end, float* __restrict sums, OutT* __restrict output) {
  const int64_t width = kWidth > 0 ? kWidth : dynamic_width;
  const int64_t row_bytes = width * static_cast<int64_t>(sizeof(T));
  const int64_t range_end = static_cast<int64_t>(csr.row_splits[bag_end]);
  for (int64_t b = bag_begin; b < bag_end; ++b) {
    const float divisor = HalfBagDivisor(csr, num_rows, kWeighted ? weights : nullptr, combiner, b);
    std::fill(sums, sums + width, 0.0f);
    const int64_t end = static_cast<int64_t>(csr.row_splits[b + 1]);
    for (int64_t j = csr.row_splits[b]; divisor != 0.0f && j < end; ++j) {
      if (j + kPrefetchDistance < range_end) {
        const IdT ahead = csr.ids[j + kPrefetchDistance];
        if (InRange(ahead, num_rows)) {
          PrefetchRow(params + static_cast<int64_t>(ahead) * width, row_bytes);
        }
      }
      const IdT id = csr.ids[j];
      if (!InRange(id, num_rows)) continue;  // Only reachable with BoundsCheck::kSkip.
      const T* __restrict row = params + static_cast<int64_t>(id) * width;
      if constexpr (kWeighted) {
        const float weight = Widen(weights[j]);
        for (int64_t w = 0; w < width; ++w) sums[w] += Widen(row[w]) * weight;
      } else {
        for (int64_t w = 0; w < width; ++w) sums[w] += Widen(row[w]);
      }
    }
    OutT* __restrict out = output + b * width;
    if (combiner != Combiner::kSum && divisor != 0.0f) {
      for (int64_t w = 0; w < width; ++w) Store(sums[w] / divisor, out + w);
    } else {
      for (int64_t w = 0; w < width; ++w) Store(sums[w], out + w);
    }
  }
}

template <int64_t kWidth, typename T, typename OutT, typename IdT, typename OffsetT>
__attribute__((always_inline)) inline void HalfForwardBagsWidth(
    const T* params, int64_t num_rows, int64_t width, const CsrIds<IdT, OffsetT>& csr,
    const OutT* weights, Combiner combiner, int64_t bag_begin, int64_t bag_end, OutT* output) {
  if constexpr (kWidth > 0) {
    alignas(kEigenPacketBytes) float sums[kWidth];
    if (weights != nullptr) {
      return HalfForwardBagsImpl<kWidth, true>(params, num_rows, width, csr, weights, combiner,
                                               bag_begin, bag_end, sums, output);
    }
    HalfForwardBagsImpl<kWidth, false>(params, num_rows, width, csr, weights, combiner, bag_begin,
                                       bag_end, sums, output);
  } else {
    std::vector<float> sums(width);
    if (weights != nullptr) {
      return HalfForwardBagsImpl<0, true>(params, num_rows, width, csr, weights, combiner,
                                          bag_begin, bag_end, sums.data(), output);
    }
    HalfForwardBagsImpl<0, false>(params, num_rows, width, csr, weights, combiner, bag_begin,
                                  bag_end, sums.data(), output);
  }
}

template <typename T, typename OutT, typename IdT, typename OffsetT>
__attribute__((always_inline)) inline void HalfForwardBagsAnyWidth(
    const T* params, int64_t num_rows, int64_t width, const CsrIds<IdT, OffsetT>& csr,
    const OutT* weights, Combiner combiner, int64_t bag_begin, int64_t bag_end, OutT* output) {
  switch (width) {
#define DE_HALF_FIXED_WIDTH(kWidth)                                                      \
  case kWidth:                                                                           \
    return HalfForwardBagsWidth<kWidth>(params, num_rows, width, csr, weights, combiner, \
                                        bag_begin, bag_end, output);
    DE_HALF_FIXED_WIDTH(16)
    DE_HALF_FIXED_WIDTH(32)
    DE_HALF_FIXED_WIDTH(64)
    DE_HALF_FIXED_WIDTH(128)
    DE_HALF_FIXED_WIDTH(256)
#undef DE_HALF_FIXED_WIDTH
    default:
      return HalfForwardBagsWidth<0>(params, num_rows, width, csr, weights, combiner, bag_begin,
                                     bag_end, output);
  }
}

template <typename T, typename OutT, typename IdT, typename OffsetT>
void HalfForwardBagsPortable(const T* params, int64_t num_rows, int64_t width,
                             const CsrIds<IdT, OffsetT>& csr, const OutT* weights,
                             Combiner combiner, int64_t bag_begin, int64_t bag_end, OutT* output) {
  HalfForwardBagsAnyWidth(params, num_rows, width, csr, weights, combiner, bag_begin, bag_end,
                          output);
}

#if DE_HAVE_AVX2_CLONES
// The same loops with 256-bit instructions; widening is integer work, so AVX2 is all it needs.
template <typename T, typename OutT, typename IdT, typename OffsetT>
__attribute__((target("avx2"))) void HalfForwardBagsAvx2(
    const T* params, int64_t num_rows, int64_t width, const CsrIds<IdT, OffsetT>& csr,
    const OutT* weights, Combiner combiner, int64_t bag_begin, int64_t bag_end, OutT* output) {
  HalfForwardBagsAnyWidth(params, num_rows, width, csr, weights, combiner, bag_begin, bag_end,
                          output);
}
#endif

// `values` (n of them) as floats: the array itself when it holds floats, else widened into
// `storage`.
template <typename U>
const float* AsFloats(const U* values, int64_t n, std::vector<float>* storage) {
  if constexpr (std::is_same_v<U, float>) {
    return values;
  } else {
    storage->resize(n);
    for (int64_t i = 0; i < n; ++i) (*storage)[i] = Widen(values[i]);
    return storage->data();
  }
}

}  // namespace

template <typename T, typename OutT, typename IdT, typename OffsetT>
Status HalfPooledLookupForwardCpu(const T* params, int64_t num_rows, int64_t width,
                                  const CsrIds<IdT, OffsetT>& csr, const OutT* weights,
                                  Combiner combiner, BoundsCheck bounds_check, OutT* output,
                                  const ParallelFor& parallel_for) {
  static_assert(kIsHalf<T>, "HalfPooledLookupForwardCpu reads Float16 or BFloat16 tables");
  DE_RETURN_IF_ERROR(ValidateCsrIds(csr, num_rows, bounds_check));
  if (width == 0) return Status::Ok();
  const int64_t cost_per_id = width * static_cast<int64_t>(sizeof(T));
  const auto forward_bags = [&](int64_t begin, int64_t end) {
#if DE_HAVE_AVX2_CLONES
    if (CpuHasAvx2()) {
      return HalfForwardBagsAvx2(params, num_rows, width, csr, weights, combiner, begin, end,
                                 output);
    }
#endif
    HalfForwardBagsPortable(params, num_rows, width, csr, weights, combiner, begin, end, output);
  };
  RunParallelBalanced(parallel_for, csr.batch, csr.row_splits, cost_per_id, forward_bags);
  return Status::Ok();
}

template <typename T, typename GradT, typename IdT, typename OffsetT>
Status HalfPooledLookupBackwardCpu(const GradT* grad_output, int64_t num_rows, int64_t width,
                                   const CsrIds<IdT, OffsetT>& csr, const GradT* weights,
                                   Combiner combiner, BoundsCheck bounds_check, IdT* unique_ids,
                                   T* unique_grad, int64_t* num_unique,
                                   const ParallelFor& parallel_for) {
  static_assert(kIsHalf<T>, "HalfPooledLookupBackwardCpu writes Float16 or BFloat16 gradients");
  DE_RETURN_IF_ERROR(ValidateCsrIds(csr, num_rows, bounds_check));
  *num_unique = 0;
  try {
    std::vector<float> grad_storage, weights_storage;
    const float* grad = AsFloats(grad_output, csr.batch * width, &grad_storage);
    const float* float_weights =
        weights == nullptr ? nullptr : AsFloats(weights, csr.nnz, &weights_storage);
    // Uninitialized: the float backward writes every row it reports.
    std::unique_ptr<float[]> sums(new float[MaxUniqueIds(csr.nnz, num_rows) * width]);
    BackwardValidated(grad, num_rows, width, csr, float_weights, combiner, unique_ids, sums.get(),
                      num_unique, parallel_for);
    RunParallel(parallel_for, *num_unique, width * 4, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin * width; i < end * width; ++i) Store(sums[i], unique_grad + i);
    });
  } catch (const std::bad_alloc&) {
    *num_unique = 0;
    return Status::ResourceExhausted("out of memory for the backward pass's scratch buffers (" +
                                     std::to_string(csr.nnz) + " ids).");
  }
  return Status::Ok();
}

#define DE_INSTANTIATE_HALF_CPU_LOOKUP(T, OutT, IdT, OffsetT)                                    \
  template Status HalfPooledLookupForwardCpu(const T*, int64_t, int64_t,                         \
                                             const CsrIds<IdT, OffsetT>&, const OutT*, Combiner, \
                                             BoundsCheck, OutT*, const ParallelFor&);            \
  template Status HalfPooledLookupBackwardCpu(                                                   \
      const OutT*, int64_t, int64_t, const CsrIds<IdT, OffsetT>&, const OutT*, Combiner,         \
      BoundsCheck, IdT*, T*, int64_t*, const ParallelFor&);

#define DE_INSTANTIATE_HALF_CPU_LOOKUP_IDS(T, OutT)         \
  DE_INSTANTIATE_HALF_CPU_LOOKUP(T, OutT, int32_t, int32_t) \
  DE_INSTANTIATE_HALF_CPU_LOOKUP(T, OutT, int32_t, int64_t) \
  DE_INSTANTIATE_HALF_CPU_LOOKUP(T, OutT, int64_t, int32_t) \
  DE_INSTANTIATE_HALF_CPU_LOOKUP(T, OutT, int64_t, int64_t)

DE_INSTANTIATE_HALF_CPU_LOOKUP_IDS(Float16, Float16)
DE_INSTANTIATE_HALF_CPU_LOOKUP_IDS(Float16, float)
DE_INSTANTIATE_HALF_CPU_LOOKUP_IDS(BFloat16, BFloat16)
DE_INSTANTIATE_HALF_CPU_LOOKUP_IDS(BFloat16, float)

#undef DE_INSTANTIATE_HALF_CPU_LOOKUP_IDS
#undef DE_INSTANTIATE_HALF_CPU_LOOKUP

}  // namespace distributed_embeddings
