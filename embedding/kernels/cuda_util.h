// What the CUDA sources of the kernel library share: CUDA errors as Status, launch shapes, sort
// widths and aligned carving of a caller's workspace. Internal to the kernel library; host code
// only.
#ifndef DISTRIBUTED_EMBEDDINGS_EMBEDDING_KERNELS_CUDA_UTIL_H_
#define DISTRIBUTED_EMBEDDINGS_EMBEDDING_KERNELS_CUDA_UTIL_H_

#include <cuda_runtime_api.h>

#include <algorithm>
#include <climits>
#include <cstddef>
#include <cstdint>
#include <string>

#include "embedding/kernels/status.h"

namespace distributed_embeddings {
namespace cuda_internal {

constexpr size_t kAlign = 256;
constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 4;
// "No offending position found" in the validation kernels' atomicMin verdicts.
constexpr unsigned long long kNoError = ULLONG_MAX;

inline size_t AlignUp(size_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; }

inline Status CudaError(cudaError_t error, const char* what) {
  return Status::Internal(std::string(what) + " failed: " + cudaGetErrorString(error));
}

// Blocks for `items` work items at `per_block` each: at least one, at most a grid-stride loop's
// worth (kernels loop over what a capped grid does not cover).
inline int Blocks(int64_t items, int per_block) {
  const int64_t blocks = (items + per_block - 1) / per_block;
  return static_cast<int>(std::min<int64_t>(std::max<int64_t>(blocks, 1), 65535 * 32));
}

// Bits a radix sort must look at for keys up to max_key.
inline int EndBit(int64_t max_key) {
  int bits = 1;
  while (bits < 63 && (int64_t{1} << bits) <= max_key) ++bits;
  return bits;
}

// Hands out aligned slices of a caller's workspace; with a null base it only measures.
class Carver {
 public:
  explicit Carver(void* base) : base_(static_cast<char*>(base)) {}
  template <typename U>
  U* Take(size_t count) {
    char* p = base_ + used_;
    used_ += AlignUp(count * sizeof(U));
    return reinterpret_cast<U*>(p);
  }
  size_t used() const { return used_; }

 private:
  char* base_;
  size_t used_ = 0;
};

}  // namespace cuda_internal
}  // namespace distributed_embeddings

#define DE_RETURN_IF_CUDA_ERROR(expr, what)                                     \
  do {                                                                          \
    cudaError_t de_err_ = (expr);                                               \
    if (de_err_ != cudaSuccess)                                                 \
      return ::distributed_embeddings::cuda_internal::CudaError(de_err_, what); \
  } while (0)

#endif  // DISTRIBUTED_EMBEDDINGS_EMBEDDING_KERNELS_CUDA_UTIL_H_
