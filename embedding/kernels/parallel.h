// ParallelFor: how CPU kernels split work across threads without owning a thread pool.
//
// The TensorFlow binding passes one backed by the op's intra-op pool, tests pass one backed by
// std::thread, and an empty ParallelFor runs the work inline on the calling thread.
#ifndef DISTRIBUTED_EMBEDDINGS_EMBEDDING_KERNELS_PARALLEL_H_
#define DISTRIBUTED_EMBEDDINGS_EMBEDDING_KERNELS_PARALLEL_H_

#include <algorithm>
#include <cstdint>
#include <functional>
#include <vector>

namespace distributed_embeddings {

// Calls work(begin, end) on disjoint ranges covering [0, total), possibly concurrently.
// cost_per_unit estimates the cycles one unit of work takes, so small jobs stay on one thread.
using ParallelFor = std::function<void(int64_t total, int64_t cost_per_unit,
                                       const std::function<void(int64_t, int64_t)>& work)>;

// Runs `work` through `parallel_for`, or inline when `parallel_for` is empty.
inline void RunParallel(const ParallelFor& parallel_for, int64_t total, int64_t cost_per_unit,
                        const std::function<void(int64_t, int64_t)>& work) {
  if (total <= 0) return;
  if (parallel_for) {
    parallel_for(total, cost_per_unit, work);
  } else {
    work(0, total);
  }
}

// Runs `work` over items [0, n) of uneven cost so that each share carries about the same load.
// Item i weighs (load_prefix[i + 1] - load_prefix[i]) + 1, the 1 standing for its fixed cost;
// load_prefix holds n + 1 non-decreasing entries (row_splits, say). cost_per_load estimates the
// cycles one unit of load takes.
//
// Splitting by item count alone would hand whichever thread drew the long bags of a power-law
// batch most of the work; here the items are cut into up to kMaxPieces pieces of equal load,
// which the pool then groups into contiguous shares.
template <typename PrefixT>
void RunParallelBalanced(const ParallelFor& parallel_for, int64_t n, const PrefixT* load_prefix,
                         int64_t cost_per_load, const std::function<void(int64_t, int64_t)>& work) {
  if (n <= 0) return;
  if (!parallel_for) {
    work(0, n);
    return;
  }
  constexpr int64_t kMaxPieces = 64;
  const auto load_before = [&](int64_t i) {
    return static_cast<int64_t>(load_prefix[i] - load_prefix[0]) + i;
  };
  const int64_t total = load_before(n);
  const int64_t pieces = std::min(n, kMaxPieces);
  std::vector<int64_t> bounds(pieces + 1, n);
  bounds[0] = 0;
  for (int64_t p = 1; p < pieces; ++p) {
    // The first item at or past p / pieces of the load (total * p / pieces, without overflow).
    const int64_t target = total / pieces * p + total % pieces * p / pieces;
    int64_t low = bounds[p - 1], high = n;
    while (low < high) {
      const int64_t mid = low + (high - low) / 2;
      if (load_before(mid) < target) {
        low = mid + 1;
      } else {
        high = mid;
      }
    }
    bounds[p] = low;
  }
  parallel_for(pieces, std::max<int64_t>(1, total / pieces * cost_per_load),
               [&](int64_t begin, int64_t end) {
                 if (bounds[begin] < bounds[end]) work(bounds[begin], bounds[end]);
               });
}

}  // namespace distributed_embeddings

#endif  // DISTRIBUTED_EMBEDDINGS_EMBEDDING_KERNELS_PARALLEL_H_
