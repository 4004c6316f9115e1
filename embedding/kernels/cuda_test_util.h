// How CUDA tests decide between running, skipping and failing.
//
// A case skips only when the machine has no GPU. When a GPU device node exists, or
// DE_REQUIRE_GPU=1, a CUDA runtime that cannot use it (say an old driver for CUDA 13 code) fails
// the case: a GPU host must never pass the suite by skipping it.
#ifndef DISTRIBUTED_EMBEDDINGS_EMBEDDING_KERNELS_CUDA_TEST_UTIL_H_
#define DISTRIBUTED_EMBEDDINGS_EMBEDDING_KERNELS_CUDA_TEST_UTIL_H_

#include <cuda_runtime_api.h>
#include <unistd.h>

#include <cstdlib>
#include <string>

#include "gtest/gtest.h"

namespace distributed_embeddings {
namespace testing {

inline bool GpuExpected() {
  const char* require = std::getenv("DE_REQUIRE_GPU");
  return (require != nullptr && std::string(require) == "1") || access("/dev/nvidia0", F_OK) == 0;
}

// Call from SetUp: returns normally when a CUDA device is usable.
#define DE_SKIP_OR_FAIL_WITHOUT_CUDA()                                            \
  do {                                                                            \
    int de_count_ = 0;                                                            \
    const cudaError_t de_error_ = cudaGetDeviceCount(&de_count_);                 \
    if (de_error_ == cudaSuccess && de_count_ > 0) break;                         \
    if (::distributed_embeddings::testing::GpuExpected()) {                       \
      FAIL() << "a GPU is present (or DE_REQUIRE_GPU=1) but CUDA cannot use it: " \
             << cudaGetErrorString(de_error_);                                    \
    }                                                                             \
    GTEST_SKIP() << "no CUDA device";                                             \
  } while (0)

}  // namespace testing
}  // namespace distributed_embeddings

#endif  // DISTRIBUTED_EMBEDDINGS_EMBEDDING_KERNELS_CUDA_TEST_UTIL_H_
