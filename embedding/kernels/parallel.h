// ParallelFor: how CPU kernels split work across threads without owning a thread pool.
//
// The TensorFlow binding passes one backed by the op's intra-op pool, tests pass one backed by
// std::thread, and an empty ParallelFor runs the work inline on the calling thread.
#ifndef DISTRIBUTED_EMBEDDINGS_EMBEDDING_KERNELS_PARALLEL_H_
#define DISTRIBUTED_EMBEDDINGS_EMBEDDING_KERNELS_PARALLEL_H_

#include <cstdint>
#include <functional>

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

}  // namespace distributed_embeddings

#endif  // DISTRIBUTED_EMBEDDINGS_EMBEDDING_KERNELS_PARALLEL_H_
