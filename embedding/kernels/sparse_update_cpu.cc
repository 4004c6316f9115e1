// The CPU sparse optimizer updates.
//
// The update is bound by random reads and writes of table and state rows, as the lookup is, so it
// is organised the same way: one serial pass finds the distinct indices (the lookup backward's
// hash map), then threads split the distinct rows between them and walk them in order,
// prefetching the rows a few iterations ahead, each row read and written once. When every index
// is distinct (what the lookup's own backward hands over) a row's gradient is read where it lies;
// repeated indices are first grouped by a counting sort, and their rows summed in order into a
// buffer with one row per repeated index.
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

template <SparseRule kRule, typename T, typename IdT>
__attribute__((always_inline)) inline void UpdateRowsImpl(const SparseHyper<T>& hyper,
                                                          const SparseTable<T>& table,
                                                          const DistinctRows<T, IdT>& distinct,
                                                          const T* grad, int64_t begin,
                                                          int64_t end) {
  const int64_t width = table.width;
  const int64_t row_bytes = width * static_cast<int64_t>(sizeof(T));
  constexpr bool kPerRow = kRule == SparseRule::kRowwiseAdagrad;
  const int64_t slot_width = kPerRow ? 1 : width;
  const auto prefetch = [&](int64_t u) {
    const int64_t row = static_cast<int64_t>(distinct.rows[u]);
    PrefetchRow(table.weights + row * width, row_bytes);
    if constexpr (kRule != SparseRule::kSgd) {
      if constexpr (kPerRow) {
        PrefetchLine(reinterpret_cast<const char*>(table.slots[0] + row));
      } else {
        PrefetchRow(table.slots[0] + row * width, row_bytes);
      }
    }
    if constexpr (kRule == SparseRule::kLazyAdam)
      PrefetchRow(table.slots[1] + row * width, row_bytes);
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

template <SparseRule kRule, typename T, typename IdT>
void UpdateDistinctRows(const SparseHyper<T>& hyper, const SparseTable<T>& table,
                        const DistinctRows<T, IdT>& distinct, const T* grad,
                        const ParallelFor& parallel_for) {
  const auto update = [&](int64_t begin, int64_t end) {
#if DE_HAVE_AVX2_CLONES
    if (CpuHasAvx2()) return UpdateRowsAvx2<kRule>(hyper, table, distinct, grad, begin, end);
#endif
    UpdateRowsPortable<kRule>(hyper, table, distinct, grad, begin, end);
  };
  // A row's cost: its memory traffic, table and state, read and written.
  const int64_t cost_per_row =
      2 * table.width * static_cast<int64_t>(sizeof(T)) * (1 + SparseRuleSlots(kRule));
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

}  // namespace

template <typename T, typename IdT>
Status SparseUpdateCpu(SparseRule rule, const SparseHyper<T>& hyper, const SparseTable<T>& table,
                       const IdT* indices, int64_t num_indices, const T* grad,
                       const ParallelFor& parallel_for) {
  if (table.num_rows < 0 || table.width < 0 || num_indices < 0) {
    return Status::InvalidArgument(
        "sizes must be non-negative; got num_rows " + std::to_string(table.num_rows) + ", width " +
        std::to_string(table.width) + ", num_indices " + std::to_string(num_indices) + ".");
  }
  for (int s = 0; s < SparseRuleSlots(rule); ++s) {
    if (table.slots[s] == nullptr && table.num_rows > 0) {
      return Status::InvalidArgument("the rule's state slot " + std::to_string(s) + " is missing.");
    }
  }
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

#define DE_INSTANTIATE_SPARSE_UPDATE(T, IdT)                                                \
  template Status SparseUpdateCpu(SparseRule, const SparseHyper<T>&, const SparseTable<T>&, \
                                  const IdT*, int64_t, const T*, const ParallelFor&);
DE_INSTANTIATE_SPARSE_UPDATE(float, int32_t)
DE_INSTANTIATE_SPARSE_UPDATE(float, int64_t)
DE_INSTANTIATE_SPARSE_UPDATE(double, int32_t)
DE_INSTANTIATE_SPARSE_UPDATE(double, int64_t)
#undef DE_INSTANTIATE_SPARSE_UPDATE

}  // namespace distributed_embeddings
