// Pooled lookups of half-precision tables on the CPU (embedding_lookup.h, half.h).
//
// The forward reads the table in its own type, half the bytes of a float table, which is what a
// memory-bound lookup pays for: rows are widened to float as they are added (exactly), a bag's
// sums stay in float, and each output value is rounded once. Bags are split across threads by
// their number of ids and rows are prefetched a few ids ahead, as in the float kernels; for the
// common widths the width is a compile-time constant, so the sums live in vector registers.
// The backward groups occurrences by unique id as the float one does (GroupGradientByUniqueId),
// on the widened output gradient, then sums each chunk of unique rows in float and rounds it to
// the table's type.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <new>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <cpuid.h>
#include <immintrin.h>
#endif

#include "embedding/kernels/embedding_lookup.h"
#include "embedding/kernels/embedding_lookup_cpu_impl.h"
#include "embedding/kernels/half.h"

namespace distributed_embeddings {
namespace {

// The AVX2 build (kF16c) also uses F16C: vcvtph2ps widens eight float16 values at once, and
// rounding to float16 goes through the compiler's _Float16 (GCC 12+, Clang), one vcvtps2ph.
// Elsewhere, and for bfloat16 (a shift), half.h's Widen and Store.
#if DE_HAVE_AVX2_CLONES && defined(__FLT16_MAX__)
#define DE_HAVE_FLOAT16_TYPE 1
#else
#define DE_HAVE_FLOAT16_TYPE 0
#endif

#if DE_HAVE_AVX2_CLONES
// sums[w] += row[w] (times `weight` when kWeighted) for a float16 row with F16C, eight values per
// vcvtph2ps. Its own function with the target, not always_inline: the generic loops that call it
// have no target of their own, and once they are inlined into the AVX2 build below the compiler
// may inline this too.
template <int64_t kWidth, bool kWeighted>
__attribute__((target("avx2,f16c"))) inline void AddFloat16RowF16c(const Float16* row,
                                                                   int64_t dynamic_width,
                                                                   float weight, float* sums) {
  const int64_t width = kWidth > 0 ? kWidth : dynamic_width;
  const __m256 scale = _mm256_set1_ps(weight);
  int64_t w = 0;
  for (; w + 8 <= width; w += 8) {
    __m256 value = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + w)));
    if constexpr (kWeighted) value = _mm256_mul_ps(value, scale);
    _mm256_storeu_ps(sums + w, _mm256_add_ps(_mm256_loadu_ps(sums + w), value));
  }
  if constexpr (kWidth % 8 != 0 || kWidth == 0) {  // the fixed widths are multiples of 8
    for (; w < width; ++w) sums[w] += kWeighted ? Widen(row[w]) * weight : Widen(row[w]);
  }
}
#endif

// sums[w] += row[w] (times `weight` when kWeighted) for the `width` values of a row, widened.
template <int64_t kWidth, bool kF16c, bool kWeighted, typename T>
__attribute__((always_inline)) inline void AddWidenedRow(const T* __restrict row, int64_t width,
                                                         float weight, float* __restrict sums) {
#if DE_HAVE_AVX2_CLONES
  if constexpr (kF16c && std::is_same_v<T, Float16>) {
    return AddFloat16RowF16c<kWidth, kWeighted>(row, width, weight, sums);
  }
#endif
  for (int64_t w = 0; w < width; ++w) {
    sums[w] += kWeighted ? Widen(row[w]) * weight : Widen(row[w]);
  }
}

// Store in the CPU loops: F16C's vcvtps2ph rounds to nearest even too.
template <bool kF16c, typename U>
__attribute__((always_inline)) inline void StoreOnCpu(float value, U* target) {
#if DE_HAVE_FLOAT16_TYPE
  if constexpr (kF16c && std::is_same_v<U, Float16>) {
    const _Float16 native = static_cast<_Float16>(value);
    std::memcpy(target, &native, sizeof(native));
    return;
  }
#endif
  Store(value, target);
}

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
template <int64_t kWidth, bool kWeighted, bool kF16c, typename T, typename OutT, typename IdT,
          typename OffsetT>
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
      AddWidenedRow<kWidth, kF16c, kWeighted>(row, width, kWeighted ? Widen(weights[j]) : 1.0f,
                                              sums);
    }
    OutT* __restrict out = output + b * width;
    if (combiner != Combiner::kSum && divisor != 0.0f) {
      for (int64_t w = 0; w < width; ++w) StoreOnCpu<kF16c>(sums[w] / divisor, out + w);
    } else {
      for (int64_t w = 0; w < width; ++w) StoreOnCpu<kF16c>(sums[w], out + w);
    }
  }
}

template <int64_t kWidth, bool kF16c, typename T, typename OutT, typename IdT, typename OffsetT>
__attribute__((always_inline)) inline void HalfForwardBagsWidth(
    const T* params, int64_t num_rows, int64_t width, const CsrIds<IdT, OffsetT>& csr,
    const OutT* weights, Combiner combiner, int64_t bag_begin, int64_t bag_end, OutT* output) {
  if constexpr (kWidth > 0) {
    alignas(kEigenPacketBytes) float sums[kWidth];
    if (weights != nullptr) {
      return HalfForwardBagsImpl<kWidth, true, kF16c>(params, num_rows, width, csr, weights,
                                                      combiner, bag_begin, bag_end, sums, output);
    }
    HalfForwardBagsImpl<kWidth, false, kF16c>(params, num_rows, width, csr, weights, combiner,
                                              bag_begin, bag_end, sums, output);
  } else {
    std::vector<float> sums(width);
    if (weights != nullptr) {
      return HalfForwardBagsImpl<0, true, kF16c>(params, num_rows, width, csr, weights, combiner,
                                                 bag_begin, bag_end, sums.data(), output);
    }
    HalfForwardBagsImpl<0, false, kF16c>(params, num_rows, width, csr, weights, combiner, bag_begin,
                                         bag_end, sums.data(), output);
  }
}

template <bool kF16c, typename T, typename OutT, typename IdT, typename OffsetT>
__attribute__((always_inline)) inline void HalfForwardBagsAnyWidth(
    const T* params, int64_t num_rows, int64_t width, const CsrIds<IdT, OffsetT>& csr,
    const OutT* weights, Combiner combiner, int64_t bag_begin, int64_t bag_end, OutT* output) {
  switch (width) {
#define DE_HALF_FIXED_WIDTH(kWidth)                                                             \
  case kWidth:                                                                                  \
    return HalfForwardBagsWidth<kWidth, kF16c>(params, num_rows, width, csr, weights, combiner, \
                                               bag_begin, bag_end, output);
    DE_HALF_FIXED_WIDTH(16)
    DE_HALF_FIXED_WIDTH(32)
    DE_HALF_FIXED_WIDTH(64)
    DE_HALF_FIXED_WIDTH(128)
    DE_HALF_FIXED_WIDTH(256)
#undef DE_HALF_FIXED_WIDTH
    default:
      return HalfForwardBagsWidth<0, kF16c>(params, num_rows, width, csr, weights, combiner,
                                            bag_begin, bag_end, output);
  }
}

template <typename T, typename OutT, typename IdT, typename OffsetT>
void HalfForwardBagsPortable(const T* params, int64_t num_rows, int64_t width,
                             const CsrIds<IdT, OffsetT>& csr, const OutT* weights,
                             Combiner combiner, int64_t bag_begin, int64_t bag_end, OutT* output) {
  HalfForwardBagsAnyWidth<false>(params, num_rows, width, csr, weights, combiner, bag_begin,
                                 bag_end, output);
}

#if DE_HAVE_AVX2_CLONES
// The same loops with 256-bit instructions, and F16C's float16 widening.
template <typename T, typename OutT, typename IdT, typename OffsetT>
__attribute__((target("avx2,f16c"))) void HalfForwardBagsAvx2(
    const T* params, int64_t num_rows, int64_t width, const CsrIds<IdT, OffsetT>& csr,
    const OutT* weights, Combiner combiner, int64_t bag_begin, int64_t bag_end, OutT* output) {
  HalfForwardBagsAnyWidth<true>(params, num_rows, width, csr, weights, combiner, bag_begin, bag_end,
                                output);
}

// CPUID leaf 1, ECX bit 29 (older Clangs' __builtin_cpu_supports does not know "f16c").
bool CpuHasF16c() {
  static const bool has_f16c = [] {
    unsigned int eax = 0, ebx = 0, ecx = 0, edx = 0;
    return __get_cpuid(1, &eax, &ebx, &ecx, &edx) != 0 && (ecx & (1u << 29)) != 0;
  }();
  return has_f16c;
}
#endif

// Rounds `n` floats into `target`.
template <typename T>
void RoundAllPortable(const float* values, int64_t n, T* target) {
  for (int64_t i = 0; i < n; ++i) StoreOnCpu<false>(values[i], target + i);
}

#if DE_HAVE_AVX2_CLONES
template <typename T>
__attribute__((target("avx2,f16c"))) void RoundAllAvx2(const float* values, int64_t n, T* target) {
  for (int64_t i = 0; i < n; ++i) StoreOnCpu<true>(values[i], target + i);
}
#endif

template <typename T>
void RoundAll(const float* values, int64_t n, T* target) {
#if DE_HAVE_AVX2_CLONES
  if (CpuHasAvx2() && CpuHasF16c()) return RoundAllAvx2(values, n, target);
#endif
  RoundAllPortable(values, n, target);
}

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
    if (CpuHasAvx2() && CpuHasF16c()) {
      return HalfForwardBagsAvx2(params, num_rows, width, csr, weights, combiner, begin, end,
                                 output);
    }
#endif
    HalfForwardBagsPortable(params, num_rows, width, csr, weights, combiner, begin, end, output);
  };
  RunParallelBalanced(parallel_for, csr.batch, csr.row_splits, cost_per_id, forward_bags);
  return Status::Ok();
}

namespace {

// Unique rows summed per chunk, in a float buffer this big, before they are rounded.
constexpr int64_t kChunkFloats = 16384;

// The half backward once the ids are validated: the float backward's grouping
// (GroupGradientByUniqueId), then each thread sums its unique rows in float a chunk at a time and
// rounds the chunk into `unique_grad`, so no float copy of the whole gradient is ever written.
template <typename T, typename IdT, typename OffsetT>
void HalfBackwardValidated(const float* grad_output, int64_t num_rows, int64_t width,
                           const CsrIds<IdT, OffsetT>& csr, const float* weights, Combiner combiner,
                           IdT* unique_ids, T* unique_grad, int64_t* num_unique,
                           const ParallelFor& parallel_for) {
  const GroupedGradient<float> g = GroupGradientByUniqueId(
      grad_output, num_rows, width, csr, weights, combiner, unique_ids, num_unique);
  if (*num_unique == 0 || width == 0) return;
  const int64_t chunk_rows = std::max<int64_t>(1, kChunkFloats / width);
  const auto sum_and_round = [&](int64_t begin, int64_t end) {
    std::vector<float> chunk(std::min(end - begin, chunk_rows) * width);
    for (int64_t first = begin; first < end; first += chunk_rows) {
      const int64_t last = std::min(end, first + chunk_rows);
      SumGradRows(g.source, width, weights, g.starts.data(), g.bags.data(), g.positions.data(),
                  first, last, chunk.data());
      RoundAll(chunk.data(), (last - first) * width, unique_grad + first * width);
    }
  };
  RunParallelBalanced(parallel_for, *num_unique, g.starts.data(),
                      width * static_cast<int64_t>(sizeof(float)), sum_and_round);
}

}  // namespace

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
    HalfBackwardValidated(grad, num_rows, width, csr, float_weights, combiner, unique_ids,
                          unique_grad, num_unique, parallel_for);
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
