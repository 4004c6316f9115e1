// CPU implementations of the pooled embedding lookup, its sparse backward and COO conversion.
//
// The forward pass is bound by random reads of table rows, so it walks each thread's ids in order
// and prefetches the rows kPrefetchDistance ids ahead (what FBGEMM does): a plain gather waits on
// memory latency for every row. Its summation order follows TensorFlow's CPU reduce_sum. The backward pass builds the unique ids with an open-addressing
// hash table in one serial pass, groups occurrences by unique id with a counting sort, then sums the
// gradient rows of each unique id in parallel, in occurrence order, which keeps it deterministic.
#include <algorithm>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "embedding/kernels/embedding_lookup.h"
#include "embedding/kernels/input_errors.h"

namespace distributed_embeddings {
namespace {

constexpr int64_t kPrefetchDistance = 8;
constexpr int64_t kCacheLineBytes = 64;

template <typename IdT>
inline bool InRange(IdT id, int64_t num_rows) {
  return id >= 0 && static_cast<int64_t>(id) < num_rows;
}

inline void PrefetchLine(const char* address) {
#if defined(__x86_64__)
  // Volatile asm: GCC deletes a loop whose only statement is __builtin_prefetch as dead code.
  asm volatile("prefetcht0 %0" : : "m"(*address));
#else
  __builtin_prefetch(address, /*rw=*/0, /*locality=*/3);
#endif
}

// Prefetches every cache line the row touches (a row need not start on a line boundary): the row
// is read a few iterations later.
template <typename T>
inline void PrefetchRow(const T* row, int64_t row_bytes) {
  const char* bytes = reinterpret_cast<const char*>(row);
  const int64_t misalignment = static_cast<int64_t>(reinterpret_cast<uintptr_t>(bytes) %
                                                    kCacheLineBytes);
  for (int64_t offset = -misalignment; offset < row_bytes; offset += kCacheLineBytes) {
    PrefetchLine(bytes + offset);
  }
}

template <typename T>
inline void AddRow(const T* __restrict src, int64_t width, T* __restrict dst) {
  for (int64_t w = 0; w < width; ++w) dst[w] += src[w];
}

// A compile-time width lets the compiler unroll the row fully: ~1.4x on rows already in cache
// (BENCHMARKS.md), where the loop bookkeeping of a runtime width dominates.
template <typename T, int64_t kWidth>
inline void AddRowFixed(const T* __restrict src, T* __restrict dst) {
  for (int64_t w = 0; w < kWidth; ++w) dst[w] += src[w];
}

// TensorFlow's CPU reduce_sum over the hotness axis (Eigen, AVX packets) sums a reduced length of
// at least 16 with four interleaved partial sums on the lanes that fill whole packets, and in order
// elsewhere. Following the same order makes dense lookups equal tf.reduce_sum(tf.gather(...)) bit
// for bit, so a model can switch to this op without any numeric drift.
constexpr int64_t kEigenUnrollMinLength = 16;
constexpr int64_t kEigenPacketBytes = 32;

// Sums (or averages) the rows of bags [bag_begin, bag_end). `scratch` holds 3 * width values for
// the interleaved partial sums. Division, not multiplication by a reciprocal, keeps the mean
// identical to tf.reduce_mean.
template <typename T, typename IdT, typename OffsetT>
void ForwardBags(const T* __restrict params, int64_t num_rows, int64_t width,
                 const CsrIds<IdT, OffsetT>& csr, Combiner combiner, int64_t bag_begin,
                 int64_t bag_end, T* __restrict output) {
  const int64_t row_bytes = width * static_cast<int64_t>(sizeof(T));
  const int64_t range_end = static_cast<int64_t>(csr.row_splits[bag_end]);
  const int64_t packet_lanes = width / (kEigenPacketBytes / sizeof(T)) * (kEigenPacketBytes / sizeof(T));
  std::vector<T> scratch(3 * packet_lanes);
  // Issues the loads of the row kPrefetchDistance ids ahead of position j.
  const auto prefetch_ahead = [&](int64_t j) {
    if (j + kPrefetchDistance < range_end) {
      const IdT ahead = csr.ids[j + kPrefetchDistance];
      if (InRange(ahead, num_rows)) {
        PrefetchRow(params + static_cast<int64_t>(ahead) * width, row_bytes);
      }
    }
  };
  for (int64_t b = bag_begin; b < bag_end; ++b) {
    T* __restrict out = output + b * width;
    std::fill(out, out + width, T(0));
    const int64_t begin = static_cast<int64_t>(csr.row_splits[b]);
    const int64_t end = static_cast<int64_t>(csr.row_splits[b + 1]);
    const bool interleave = end - begin >= kEigenUnrollMinLength && packet_lanes > 0;
    const int64_t interleaved_end = interleave ? begin + (end - begin) / 4 * 4 : begin;
    int64_t valid = 0;
    if (interleave) std::fill(scratch.begin(), scratch.end(), T(0));
    for (int64_t j = begin; j < interleaved_end; ++j) {
      prefetch_ahead(j);
      const IdT id = csr.ids[j];
      if (!InRange(id, num_rows)) continue;  // Only reachable with BoundsCheck::kSkip.
      const T* row = params + static_cast<int64_t>(id) * width;
      const int64_t k = (j - begin) % 4;
      AddRow(row, packet_lanes, k == 0 ? out : scratch.data() + (k - 1) * packet_lanes);
      AddRow(row + packet_lanes, width - packet_lanes, out + packet_lanes);
      ++valid;
    }
    if (interleave) {
      for (int64_t k = 0; k < 3; ++k) AddRow(scratch.data() + k * packet_lanes, packet_lanes, out);
    }
    const auto add_rows_in_order = [&](auto add_row) {
      for (int64_t j = interleaved_end; j < end; ++j) {
        prefetch_ahead(j);
        const IdT id = csr.ids[j];
        if (!InRange(id, num_rows)) continue;
        add_row(params + static_cast<int64_t>(id) * width, out);
        ++valid;
      }
    };
    // Each case passes a lambda of its own type, so each gets its own inlined instantiation.
    switch (width) {
      case 16: add_rows_in_order([](const T* r, T* o) { AddRowFixed<T, 16>(r, o); }); break;
      case 32: add_rows_in_order([](const T* r, T* o) { AddRowFixed<T, 32>(r, o); }); break;
      case 64: add_rows_in_order([](const T* r, T* o) { AddRowFixed<T, 64>(r, o); }); break;
      case 128: add_rows_in_order([](const T* r, T* o) { AddRowFixed<T, 128>(r, o); }); break;
      case 256: add_rows_in_order([](const T* r, T* o) { AddRowFixed<T, 256>(r, o); }); break;
      default: add_rows_in_order([width](const T* r, T* o) { AddRow(r, width, o); });
    }
    if (combiner == Combiner::kMean && valid > 1) {
      const T count = static_cast<T>(valid);
      for (int64_t w = 0; w < width; ++w) out[w] /= count;
    }
  }
}

// Open-addressing hash map from id to its index among the unique ids, in first-occurrence order.
template <typename IdT>
class UniqueIdMap {
 public:
  explicit UniqueIdMap(int64_t max_unique) {
    int64_t capacity = 16;
    while (capacity < 2 * max_unique) capacity *= 2;
    mask_ = static_cast<uint64_t>(capacity - 1);
    keys_.assign(capacity, kEmpty);
    values_.resize(capacity);
  }

  // Returns the index of `id`, giving it the next index if it is new.
  int64_t Insert(IdT id, IdT* unique_ids, int64_t* num_unique) {
    uint64_t slot = Hash(id) & mask_;
    while (true) {
      if (keys_[slot] == static_cast<int64_t>(id)) return values_[slot];
      if (keys_[slot] == kEmpty) {
        keys_[slot] = static_cast<int64_t>(id);
        values_[slot] = *num_unique;
        unique_ids[*num_unique] = id;
        return (*num_unique)++;
      }
      slot = (slot + 1) & mask_;
    }
  }

 private:
  static constexpr int64_t kEmpty = -1;  // Valid ids are never negative.

  static uint64_t Hash(IdT id) {
    // Fibonacci hashing spreads consecutive ids; the high bits are the well-mixed ones.
    const uint64_t h = static_cast<uint64_t>(id) * 0x9E3779B97F4A7C15ull;
    return h ^ (h >> 32);
  }

  uint64_t mask_ = 0;
  std::vector<int64_t> keys_;
  std::vector<int64_t> values_;
};

}  // namespace

template <typename IdT, typename OffsetT>
Status ValidateCsrIds(const CsrIds<IdT, OffsetT>& csr, int64_t num_rows, BoundsCheck bounds_check) {
  if (csr.nnz > static_cast<int64_t>(std::numeric_limits<OffsetT>::max())) {
    return NnzTooLargeError(csr.nnz, std::numeric_limits<OffsetT>::max());
  }
  const OffsetT* splits = csr.row_splits;
  if (splits[0] != 0) return RowSplitsStartError(splits[0]);
  for (int64_t b = 0; b < csr.batch; ++b) {
    if (splits[b] > splits[b + 1]) return RowSplitsDecreasingError(b, splits[b], splits[b + 1]);
  }
  if (static_cast<int64_t>(splits[csr.batch]) != csr.nnz) {
    return RowSplitsEndError(csr.batch, splits[csr.batch], csr.nnz);
  }
  if (bounds_check == BoundsCheck::kError) {
    for (int64_t j = 0; j < csr.nnz; ++j) {
      if (!InRange(csr.ids[j], num_rows)) return IdOutOfRangeError(j, csr.ids[j], num_rows);
    }
  }
  return Status::Ok();
}

template <typename T, typename IdT, typename OffsetT>
Status PooledLookupForwardCpu(const T* params, int64_t num_rows, int64_t width,
                              const CsrIds<IdT, OffsetT>& csr, Combiner combiner,
                              BoundsCheck bounds_check, T* output,
                              const ParallelFor& parallel_for) {
  DE_RETURN_IF_ERROR(ValidateCsrIds(csr, num_rows, bounds_check));
  if (width == 0) return Status::Ok();
  const int64_t mean_hotness = csr.batch > 0 ? csr.nnz / csr.batch + 1 : 1;
  const int64_t cost_per_bag = mean_hotness * width * static_cast<int64_t>(sizeof(T));
  RunParallel(parallel_for, csr.batch, cost_per_bag, [&](int64_t begin, int64_t end) {
    ForwardBags(params, num_rows, width, csr, combiner, begin, end, output);
  });
  return Status::Ok();
}

template <typename T, typename IdT, typename OffsetT>
Status PooledLookupBackwardCpu(const T* grad_output, int64_t num_rows, int64_t width,
                               const CsrIds<IdT, OffsetT>& csr, Combiner combiner,
                               BoundsCheck bounds_check, IdT* unique_ids, T* unique_grad,
                               int64_t* num_unique, const ParallelFor& parallel_for) {
  DE_RETURN_IF_ERROR(ValidateCsrIds(csr, num_rows, bounds_check));
  *num_unique = 0;
  if (csr.nnz == 0) return Status::Ok();

  // 1. Unique ids in first-occurrence order; -1 marks a skipped invalid id.
  std::vector<int64_t> unique_of(csr.nnz);
  {
    UniqueIdMap<IdT> map(MaxUniqueIds(csr.nnz, num_rows));
    for (int64_t j = 0; j < csr.nnz; ++j) {
      unique_of[j] = InRange(csr.ids[j], num_rows)
                         ? map.Insert(csr.ids[j], unique_ids, num_unique)
                         : -1;
    }
  }
  const int64_t n_unique = *num_unique;
  if (n_unique == 0) return Status::Ok();  // Every id skipped (BoundsCheck::kSkip).

  // 2. The gradient each occurrence contributes: the bag's output gradient, divided by the bag's
  //    valid length for mean (once per bag, as tf.reduce_mean's gradient does).
  std::vector<int64_t> bag_of(csr.nnz);
  std::vector<T> scaled;
  const T* source = grad_output;
  if (combiner == Combiner::kMean) scaled.resize(csr.batch * width);
  for (int64_t b = 0; b < csr.batch; ++b) {
    int64_t valid = 0;
    for (int64_t j = csr.row_splits[b]; j < static_cast<int64_t>(csr.row_splits[b + 1]); ++j) {
      bag_of[j] = b;
      valid += unique_of[j] >= 0;
    }
    if (combiner == Combiner::kMean) {
      const T count = static_cast<T>(valid > 1 ? valid : 1);
      for (int64_t w = 0; w < width; ++w) {
        scaled[b * width + w] = valid > 1 ? grad_output[b * width + w] / count
                                          : grad_output[b * width + w];
      }
    }
  }
  if (combiner == Combiner::kMean) source = scaled.data();

  // 3. Counting sort of occurrences by unique index, keeping occurrence order within each id.
  std::vector<int64_t> starts(n_unique + 1, 0);
  for (int64_t j = 0; j < csr.nnz; ++j) {
    if (unique_of[j] >= 0) ++starts[unique_of[j] + 1];
  }
  for (int64_t u = 0; u < n_unique; ++u) starts[u + 1] += starts[u];
  std::vector<int64_t> occurrences(starts[n_unique]);
  {
    std::vector<int64_t> cursor(starts.begin(), starts.end() - 1);
    for (int64_t j = 0; j < csr.nnz; ++j) {
      if (unique_of[j] >= 0) occurrences[cursor[unique_of[j]]++] = j;
    }
  }

  // 4. Sum each unique id's gradient rows, unique ids split across threads.
  const int64_t cost_per_unique =
      (csr.nnz / n_unique + 1) * width * static_cast<int64_t>(sizeof(T));
  RunParallel(parallel_for, n_unique, cost_per_unique, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      T* __restrict out = unique_grad + u * width;
      std::fill(out, out + width, T(0));
      for (int64_t k = starts[u]; k < starts[u + 1]; ++k) {
        AddRow(source + bag_of[occurrences[k]] * width, width, out);
      }
    }
  });
  return Status::Ok();
}

template <typename OffsetT>
Status CooToRowSplitsCpu(const int64_t* indices, int64_t nnz, int64_t num_rows_dense,
                         int64_t num_cols_dense, OffsetT* row_splits) {
  if (nnz > static_cast<int64_t>(std::numeric_limits<OffsetT>::max())) {
    return NnzTooLargeError(nnz, std::numeric_limits<OffsetT>::max());
  }
  for (int64_t j = 0; j < nnz; ++j) {
    const int64_t row = indices[2 * j];
    const int64_t col = indices[2 * j + 1];
    if (row < 0 || row >= num_rows_dense || col < 0 || col >= num_cols_dense) {
      return CooIndexOutOfBoundsError(j, row, col, num_rows_dense, num_cols_dense);
    }
    if (j > 0) {
      const int64_t prev_row = indices[2 * j - 2];
      const int64_t prev_col = indices[2 * j - 1];
      if (row < prev_row || (row == prev_row && col <= prev_col)) {
        return CooIndexOrderError(j, row, col, prev_row, prev_col);
      }
    }
  }
  // Rows are sorted, so row_splits[r] is the position of the first index with row >= r.
  int64_t j = 0;
  for (int64_t r = 0; r <= num_rows_dense; ++r) {
    while (j < nnz && indices[2 * j] < r) ++j;
    row_splits[r] = static_cast<OffsetT>(j);
  }
  return Status::Ok();
}

#define DE_INSTANTIATE_CSR(IdT, OffsetT)                                                        \
  template Status ValidateCsrIds(const CsrIds<IdT, OffsetT>&, int64_t, BoundsCheck);

#define DE_INSTANTIATE_LOOKUP(T, IdT, OffsetT)                                                  \
  template Status PooledLookupForwardCpu(const T*, int64_t, int64_t,                            \
                                         const CsrIds<IdT, OffsetT>&, Combiner, BoundsCheck,    \
                                         T*, const ParallelFor&);                               \
  template Status PooledLookupBackwardCpu(const T*, int64_t, int64_t,                           \
                                          const CsrIds<IdT, OffsetT>&, Combiner, BoundsCheck,   \
                                          IdT*, T*, int64_t*, const ParallelFor&);

DE_INSTANTIATE_CSR(int32_t, int32_t)
DE_INSTANTIATE_CSR(int32_t, int64_t)
DE_INSTANTIATE_CSR(int64_t, int32_t)
DE_INSTANTIATE_CSR(int64_t, int64_t)
DE_INSTANTIATE_LOOKUP(float, int32_t, int32_t)
DE_INSTANTIATE_LOOKUP(float, int32_t, int64_t)
DE_INSTANTIATE_LOOKUP(float, int64_t, int32_t)
DE_INSTANTIATE_LOOKUP(float, int64_t, int64_t)
DE_INSTANTIATE_LOOKUP(double, int32_t, int32_t)
DE_INSTANTIATE_LOOKUP(double, int32_t, int64_t)
DE_INSTANTIATE_LOOKUP(double, int64_t, int32_t)
DE_INSTANTIATE_LOOKUP(double, int64_t, int64_t)
template Status CooToRowSplitsCpu(const int64_t*, int64_t, int64_t, int64_t, int32_t*);
template Status CooToRowSplitsCpu(const int64_t*, int64_t, int64_t, int64_t, int64_t*);

#undef DE_INSTANTIATE_CSR
#undef DE_INSTANTIATE_LOOKUP

}  // namespace distributed_embeddings
