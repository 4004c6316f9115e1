// The CPU sparse optimizer updates.
//
// The update is bound by random reads and writes of table and state rows, as the lookup is, so it
// is organised the same way: one serial pass finds the distinct indices (the lookup backward's
// hash map), then threads split the distinct rows between them and walk them in order,
// prefetching the rows a few iterations ahead, each row read and written once. When every index
// is distinct (what the lookup's own backward hands over) a row's gradient is read where it lies;
// repeated indices are first grouped by a counting sort, and their rows summed in order into a
// buffer with one row per repeated index.
//
// LookupGradSparseUpdateCpu starts from the lookup's output gradient instead: it groups the
// occurrences by distinct id as the lookup backward does, then each thread sums the gradient of a
// few distinct ids at a time into a buffer on its stack (small enough to stay in L1) and applies
// them at once, so the unique gradient never goes out to memory and back.
#include <cmath>
#include <new>
#include <string>
#include <vector>

#include "embedding/kernels/embedding_lookup_cpu_impl.h"
#include "embedding/kernels/sparse_update.h"

namespace distributed_embeddings {

int SparseRuleSlots(SparseRule rule) {
  switch (rule) {
    case SparseRule::kSgd:
      return 0;
    case SparseRule::kAdagrad:
    case SparseRule::kRowwiseAdagrad:
      return 1;
    case SparseRule::kLazyAdam:
      return 2;
  }
  return 0;
}

bool SparseRuleSlotsPerRow(SparseRule rule) { return rule == SparseRule::kRowwiseAdagrad; }

namespace {

constexpr int64_t kUpdatePrefetchDistance = 4;

// One row's update (the rules in sparse_update.h), with Keras's operations in Keras's order. The
// kernel library builds with -ffp-contract=off: no fused multiply-add may merge two roundings.
template <SparseRule kRule, typename T>
__attribute__((always_inline)) inline void UpdateRow(const SparseHyper<T>& hyper, int64_t width,
                                                     const T* __restrict g, T* __restrict w,
                                                     T* __restrict s0, T* __restrict s1) {
  const T lr = hyper.learning_rate;
  if constexpr (kRule == SparseRule::kSgd) {
    for (int64_t k = 0; k < width; ++k) w[k] -= g[k] * lr;
  } else if constexpr (kRule == SparseRule::kAdagrad) {
    const T eps = hyper.epsilon;
    for (int64_t k = 0; k < width; ++k) {
      s0[k] += g[k] * g[k];
      w[k] -= (lr * g[k]) / std::sqrt(s0[k] + eps);
    }
  } else if constexpr (kRule == SparseRule::kRowwiseAdagrad) {
    T sum_squares = 0;
    for (int64_t k = 0; k < width; ++k) sum_squares += g[k] * g[k];
    s0[0] += sum_squares / static_cast<T>(width);
    const T denominator = std::sqrt(s0[0] + hyper.epsilon);
    for (int64_t k = 0; k < width; ++k) w[k] -= (lr * g[k]) / denominator;
  } else {
    const T b1 = hyper.one_minus_beta1, b2 = hyper.one_minus_beta2, eps = hyper.epsilon;
    for (int64_t k = 0; k < width; ++k) {
      s0[k] += (g[k] - s0[k]) * b1;
      s1[k] += (g[k] * g[k] - s1[k]) * b2;
      w[k] -= (s0[k] * lr) / (std::sqrt(s1[k]) + eps);
    }
  }
}

// What the threads share: the distinct rows and where each one's gradient rows are.
template <typename T, typename IdT>
struct DistinctRows {
  const IdT* rows = nullptr;  // [count] the distinct indices, in first-occurrence order
  int64_t count = 0;
  const int64_t* starts = nullptr;  // [count + 1] into `order`; null when every index is distinct
  const int64_t* order = nullptr;   // positions in the gradient, grouped by distinct index
  const int64_t* sum_of = nullptr;  // [count] the row of `sums` of a repeated index, else -1
  T* sums = nullptr;                // a summed gradient row for each repeated index
};

// Prefetches what the update of `row` reads and writes: the table's row and its state.
template <SparseRule kRule, typename T>
__attribute__((always_inline)) inline void PrefetchUpdatedRow(const SparseTable<T>& table,
                                                              int64_t row) {
  const int64_t width = table.width;
  const int64_t row_bytes = width * static_cast<int64_t>(sizeof(T));
  PrefetchRow(table.weights + row * width, row_bytes);
  if constexpr (kRule == SparseRule::kRowwiseAdagrad) {
    PrefetchLine(reinterpret_cast<const char*>(table.slots[0] + row));
  } else if constexpr (kRule != SparseRule::kSgd) {
    PrefetchRow(table.slots[0] + row * width, row_bytes);
  }
  if constexpr (kRule == SparseRule::kLazyAdam) {
    PrefetchRow(table.slots[1] + row * width, row_bytes);
  }
}

template <SparseRule kRule, typename T, typename IdT>
__attribute__((always_inline)) inline void UpdateRowsImpl(const SparseHyper<T>& hyper,
                                                          const SparseTable<T>& table,
                                                          const DistinctRows<T, IdT>& distinct,
                                                          const T* grad, int64_t begin,
                                                          int64_t end) {
  const int64_t width = table.width;
  const int64_t slot_width = kRule == SparseRule::kRowwiseAdagrad ? 1 : width;
  const auto prefetch = [&](int64_t u) {
    PrefetchUpdatedRow<kRule>(table, static_cast<int64_t>(distinct.rows[u]));
  };
  for (int64_t u = begin; u < std::min(end, begin + kUpdatePrefetchDistance); ++u) prefetch(u);
  for (int64_t u = begin; u < end; ++u) {
    if (u + kUpdatePrefetchDistance < end) prefetch(u + kUpdatePrefetchDistance);
    const int64_t row = static_cast<int64_t>(distinct.rows[u]);
    const T* g = grad + u * width;
    if (distinct.starts != nullptr) {
      const int64_t first = distinct.starts[u], last = distinct.starts[u + 1];
      g = grad + distinct.order[first] * width;
      if (last - first > 1) {
        T* sum = distinct.sums + distinct.sum_of[u] * width;
        std::copy(g, g + width, sum);
        for (int64_t j = first + 1; j < last; ++j) {
          AddRow(grad + distinct.order[j] * width, width, sum);
        }
        g = sum;
      }
    }
    T* s0 = kRule == SparseRule::kSgd ? nullptr : table.slots[0] + row * slot_width;
    T* s1 = kRule == SparseRule::kLazyAdam ? table.slots[1] + row * width : nullptr;
    UpdateRow<kRule>(hyper, width, g, table.weights + row * width, s0, s1);
  }
}

template <SparseRule kRule, typename T, typename IdT>
void UpdateRowsPortable(const SparseHyper<T>& hyper, const SparseTable<T>& table,
                        const DistinctRows<T, IdT>& distinct, const T* grad, int64_t begin,
                        int64_t end) {
  UpdateRowsImpl<kRule>(hyper, table, distinct, grad, begin, end);
}

#if DE_HAVE_AVX2_CLONES
// The same loops with 256-bit instructions (no FMA: same results, bit for bit).
template <SparseRule kRule, typename T, typename IdT>
__attribute__((target("avx2"))) void UpdateRowsAvx2(const SparseHyper<T>& hyper,
                                                    const SparseTable<T>& table,
                                                    const DistinctRows<T, IdT>& distinct,
                                                    const T* grad, int64_t begin, int64_t end) {
  UpdateRowsImpl<kRule>(hyper, table, distinct, grad, begin, end);
}
#endif

// UpdateRowsImpl, in the AVX2 build where the CPU has it.
template <SparseRule kRule, typename T, typename IdT>
void UpdateRows(const SparseHyper<T>& hyper, const SparseTable<T>& table,
                const DistinctRows<T, IdT>& distinct, const T* grad, int64_t begin, int64_t end) {
#if DE_HAVE_AVX2_CLONES
  if (CpuHasAvx2()) return UpdateRowsAvx2<kRule>(hyper, table, distinct, grad, begin, end);
#endif
  UpdateRowsPortable<kRule>(hyper, table, distinct, grad, begin, end);
}

// A row's cost: its memory traffic, table and state, read and written.
template <SparseRule kRule, typename T>
int64_t UpdateCostPerRow(const SparseTable<T>& table) {
  return 2 * table.width * static_cast<int64_t>(sizeof(T)) * (1 + SparseRuleSlots(kRule));
}

template <SparseRule kRule, typename T, typename IdT>
void UpdateDistinctRows(const SparseHyper<T>& hyper, const SparseTable<T>& table,
                        const DistinctRows<T, IdT>& distinct, const T* grad,
                        const ParallelFor& parallel_for) {
  const auto update = [&](int64_t begin, int64_t end) {
    UpdateRows<kRule>(hyper, table, distinct, grad, begin, end);
  };
  const int64_t cost_per_row = UpdateCostPerRow<kRule>(table);
  if (distinct.starts == nullptr) {
    RunParallel(parallel_for, distinct.count, cost_per_row, update);
  } else {
    RunParallelBalanced(parallel_for, distinct.count, distinct.starts, cost_per_row, update);
  }
}

template <typename T, typename IdT>
void UpdateValidated(SparseRule rule, const SparseHyper<T>& hyper, const SparseTable<T>& table,
                     const IdT* indices, int64_t num_indices, const T* grad,
                     const ParallelFor& parallel_for) {
  // 1. The distinct indices, in first-occurrence order.
  std::vector<int64_t> unique_of(num_indices);
  std::vector<IdT> rows(num_indices);
  int64_t count = 0;
  const int64_t max_unique = MaxUniqueIds(num_indices, table.num_rows);
  if (DenseIdMap<IdT>::Preferred(table.num_rows, max_unique)) {
    DenseIdMap<IdT> map(table.num_rows);
    IndexUniqueIds(map, indices, num_indices, table.num_rows, unique_of.data(), rows.data(),
                   &count);
  } else {
    UniqueIdMap<IdT> map(max_unique);
    IndexUniqueIds(map, indices, num_indices, table.num_rows, unique_of.data(), rows.data(),
                   &count);
  }
  DistinctRows<T, IdT> distinct;
  distinct.rows = rows.data();
  distinct.count = count;

  // 2. With repeats: positions grouped by distinct index, in order (a counting sort), and room
  //    for the summed row of each repeated index (allocated here: threads allocate nothing).
  std::vector<int64_t> starts, order, sum_of;
  std::vector<T> sums;
  if (count < num_indices) {
    starts.assign(count + 1, 0);
    for (int64_t j = 0; j < num_indices; ++j) ++starts[unique_of[j] + 1];
    for (int64_t u = 0; u < count; ++u) starts[u + 1] += starts[u];
    order.resize(num_indices);
    std::vector<int64_t> cursor(starts.begin(), starts.end() - 1);
    for (int64_t j = 0; j < num_indices; ++j) order[cursor[unique_of[j]]++] = j;
    sum_of.assign(count, -1);
    int64_t repeated = 0;
    for (int64_t u = 0; u < count; ++u) {
      if (starts[u + 1] - starts[u] > 1) sum_of[u] = repeated++;
    }
    sums.resize(repeated * table.width);
    distinct.starts = starts.data();
    distinct.order = order.data();
    distinct.sum_of = sum_of.data();
    distinct.sums = sums.data();
  }

  // 3. Every distinct row updated once.
  switch (rule) {
    case SparseRule::kSgd:
      return UpdateDistinctRows<SparseRule::kSgd>(hyper, table, distinct, grad, parallel_for);
    case SparseRule::kAdagrad:
      return UpdateDistinctRows<SparseRule::kAdagrad>(hyper, table, distinct, grad, parallel_for);
    case SparseRule::kRowwiseAdagrad:
      return UpdateDistinctRows<SparseRule::kRowwiseAdagrad>(hyper, table, distinct, grad,
                                                             parallel_for);
    case SparseRule::kLazyAdam:
      return UpdateDistinctRows<SparseRule::kLazyAdam>(hyper, table, distinct, grad, parallel_for);
  }
}

// The fused update's buffer of summed gradient rows, in elements: 8 KB of float32, so a chunk
// of 32 rows at width 64 stays in L1 between its sum and its update. A row wider than this is
// summed into one buffer of every distinct id's row, allocated before any thread starts.
constexpr int64_t kFusedChunkElements = 2048;

template <SparseRule kRule, typename T, typename IdT>
void UpdateFromGroupedGradient(const SparseHyper<T>& hyper, const SparseTable<T>& table,
                               const IdT* unique_ids, int64_t num_unique,
                               const GroupedGradient<T>& grouped, const T* weights, T* all_sums,
                               const ParallelFor& parallel_for) {
  const int64_t width = table.width;
  const auto update = [&](int64_t begin, int64_t end) {
    alignas(64) T chunk_sums[kFusedChunkElements];
    const int64_t chunk = all_sums == nullptr ? kFusedChunkElements / width : end - begin;
    for (int64_t c = begin; c < end; c += chunk) {
      const int64_t c_end = std::min(end, c + chunk);
      // The chunk's first rows are on their way while its gradient is summed.
      for (int64_t u = c; u < std::min(c_end, c + kUpdatePrefetchDistance); ++u) {
        PrefetchUpdatedRow<kRule>(table, static_cast<int64_t>(unique_ids[u]));
      }
      T* sums = all_sums == nullptr ? chunk_sums : all_sums + c * width;
      SumGradRows(grouped.source, width, weights, grouped.starts.data(), grouped.bags.data(),
                  grouped.positions.data(), c, c_end, sums);
      DistinctRows<T, IdT> rows;
      rows.rows = unique_ids + c;
      rows.count = c_end - c;
      UpdateRows<kRule>(hyper, table, rows, sums, 0, c_end - c);
    }
  };
  // An occurrence's cost: its gradient row read; a distinct id's: its row and state updated.
  const int64_t cost_per_occurrence =
      width * static_cast<int64_t>(sizeof(T)) + UpdateCostPerRow<kRule>(table) / 2;
  RunParallelBalanced(parallel_for, num_unique, grouped.starts.data(), cost_per_occurrence, update);
}

template <typename T, typename IdT, typename OffsetT>
void LookupGradUpdateValidated(SparseRule rule, const SparseHyper<T>& hyper,
                               const SparseTable<T>& table, const T* grad_output,
                               const CsrIds<IdT, OffsetT>& csr, const T* weights, Combiner combiner,
                               const ParallelFor& parallel_for) {
  std::vector<IdT> unique_ids(MaxUniqueIds(csr.nnz, table.num_rows));
  int64_t num_unique = 0;
  const GroupedGradient<T> grouped =
      GroupGradientByUniqueId(grad_output, table.num_rows, table.width, csr, weights, combiner,
                              unique_ids.data(), &num_unique);
  if (num_unique == 0) return;
  std::vector<T> all_sums;
  if (table.width > kFusedChunkElements) all_sums.resize(num_unique * table.width);
  T* sums = all_sums.empty() ? nullptr : all_sums.data();
  const IdT* ids = unique_ids.data();
  switch (rule) {
    case SparseRule::kSgd:
      return UpdateFromGroupedGradient<SparseRule::kSgd>(hyper, table, ids, num_unique, grouped,
                                                         weights, sums, parallel_for);
    case SparseRule::kAdagrad:
      return UpdateFromGroupedGradient<SparseRule::kAdagrad>(hyper, table, ids, num_unique, grouped,
                                                             weights, sums, parallel_for);
    case SparseRule::kRowwiseAdagrad:
      return UpdateFromGroupedGradient<SparseRule::kRowwiseAdagrad>(
          hyper, table, ids, num_unique, grouped, weights, sums, parallel_for);
    case SparseRule::kLazyAdam:
      return UpdateFromGroupedGradient<SparseRule::kLazyAdam>(hyper, table, ids, num_unique,
                                                              grouped, weights, sums, parallel_for);
  }
}

// The table's sizes and the rule's state, checked before anything is read.
template <typename T>
Status CheckSparseTable(SparseRule rule, const SparseTable<T>& table) {
  if (table.num_rows < 0 || table.width < 0) {
    return Status::InvalidArgument("sizes must be non-negative; got num_rows " +
                                   std::to_string(table.num_rows) + ", width " +
                                   std::to_string(table.width) + ".");
  }
  for (int s = 0; s < SparseRuleSlots(rule); ++s) {
    if (table.slots[s] == nullptr && table.num_rows > 0) {
      return Status::InvalidArgument("the rule's state slot " + std::to_string(s) + " is missing.");
    }
  }
  return Status::Ok();
}

}  // namespace

template <typename T, typename IdT>
Status SparseUpdateCpu(SparseRule rule, const SparseHyper<T>& hyper, const SparseTable<T>& table,
                       const IdT* indices, int64_t num_indices, const T* grad,
                       const ParallelFor& parallel_for) {
  if (num_indices < 0) {
    return Status::InvalidArgument("num_indices must be non-negative; got " +
                                   std::to_string(num_indices) + ".");
  }
  DE_RETURN_IF_ERROR(CheckSparseTable(rule, table));
  // Every index is checked before anything is written.
  for (int64_t j = 0; j < num_indices; ++j) {
    if (!InRange(indices[j], table.num_rows)) {
      return Status::InvalidArgument(
          "'indices' must lie in [0, " + std::to_string(table.num_rows) + "); got indices[" +
          std::to_string(j) + "] = " + std::to_string(static_cast<int64_t>(indices[j])) + ".");
    }
  }
  if (num_indices == 0 || table.width == 0) return Status::Ok();
  // Scratch buffers are allocated on this thread, before any row is written: running out of
  // memory for them is an error for the caller and leaves the table as it was.
  try {
    UpdateValidated(rule, hyper, table, indices, num_indices, grad, parallel_for);
  } catch (const std::bad_alloc&) {
    return Status::ResourceExhausted("out of memory for the sparse update's scratch buffers (" +
                                     std::to_string(num_indices) + " indices).");
  }
  return Status::Ok();
}

template <typename T, typename IdT, typename OffsetT>
Status LookupGradSparseUpdateCpu(SparseRule rule, const SparseHyper<T>& hyper,
                                 const SparseTable<T>& table, const T* grad_output,
                                 const CsrIds<IdT, OffsetT>& csr, const T* weights,
                                 Combiner combiner, BoundsCheck bounds_check,
                                 const ParallelFor& parallel_for) {
  DE_RETURN_IF_ERROR(CheckSparseTable(rule, table));
  DE_RETURN_IF_ERROR(ValidateCsrIds(csr, table.num_rows, bounds_check));
  if (csr.nnz == 0 || table.width == 0) return Status::Ok();
  try {
    LookupGradUpdateValidated(rule, hyper, table, grad_output, csr, weights, combiner,
                              parallel_for);
  } catch (const std::bad_alloc&) {
    return Status::ResourceExhausted("out of memory for the fused update's scratch buffers (" +
                                     std::to_string(csr.nnz) + " ids).");
  }
  return Status::Ok();
}

#define DE_INSTANTIATE_SPARSE_UPDATE(T, IdT)                                                \
  template Status SparseUpdateCpu(SparseRule, const SparseHyper<T>&, const SparseTable<T>&, \
                                  const IdT*, int64_t, const T*, const ParallelFor&);
DE_INSTANTIATE_SPARSE_UPDATE(float, int32_t)
DE_INSTANTIATE_SPARSE_UPDATE(float, int64_t)
DE_INSTANTIATE_SPARSE_UPDATE(double, int32_t)
DE_INSTANTIATE_SPARSE_UPDATE(double, int64_t)
#undef DE_INSTANTIATE_SPARSE_UPDATE

#define DE_INSTANTIATE_LOOKUP_GRAD_UPDATE(T, IdT, OffsetT)                \
  template Status LookupGradSparseUpdateCpu(                              \
      SparseRule, const SparseHyper<T>&, const SparseTable<T>&, const T*, \
      const CsrIds<IdT, OffsetT>&, const T*, Combiner, BoundsCheck, const ParallelFor&);
DE_INSTANTIATE_LOOKUP_GRAD_UPDATE(float, int32_t, int32_t)
DE_INSTANTIATE_LOOKUP_GRAD_UPDATE(float, int32_t, int64_t)
DE_INSTANTIATE_LOOKUP_GRAD_UPDATE(float, int64_t, int32_t)
DE_INSTANTIATE_LOOKUP_GRAD_UPDATE(float, int64_t, int64_t)
DE_INSTANTIATE_LOOKUP_GRAD_UPDATE(double, int32_t, int32_t)
DE_INSTANTIATE_LOOKUP_GRAD_UPDATE(double, int32_t, int64_t)
DE_INSTANTIATE_LOOKUP_GRAD_UPDATE(double, int64_t, int32_t)
DE_INSTANTIATE_LOOKUP_GRAD_UPDATE(double, int64_t, int64_t)
#undef DE_INSTANTIATE_LOOKUP_GRAD_UPDATE

}  // namespace distributed_embeddings
