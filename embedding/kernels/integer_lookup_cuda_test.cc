// Tests of the CUDA IntegerLookup; every case skips on a machine without a GPU (cuda_test_util.h).
#include "embedding/kernels/integer_lookup_cuda.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <random>
#include <vector>

#include "embedding/kernels/cuda_test_util.h"
#include "embedding/kernels/embedding_lookup_cuda.h"
#include "embedding/kernels/integer_lookup_test_util.h"
#include "gtest/gtest.h"

namespace distributed_embeddings {
namespace {

using ::distributed_embeddings::testing::ExpectConsistentIds;

class IntegerLookupCudaTest : public ::testing::Test {
 protected:
  void SetUp() override { DE_SKIP_OR_FAIL_WITHOUT_CUDA(); }

  // Runs one call on the device; returns the ids and updates `state` from the device.
  std::vector<int64_t> Lookup(std::vector<int64_t>& state, int64_t max_tokens,
                              const std::vector<int64_t>& keys, bool insert) {
    int64_t *d_state = nullptr, *d_keys = nullptr, *d_ids = nullptr;
    const size_t n = keys.size();
    EXPECT_EQ(cudaMalloc(reinterpret_cast<void**>(&d_state), state.size() * 8), cudaSuccess);
    EXPECT_EQ(cudaMalloc(reinterpret_cast<void**>(&d_keys), std::max<size_t>(n, 1) * 8),
              cudaSuccess);
    EXPECT_EQ(cudaMalloc(reinterpret_cast<void**>(&d_ids), std::max<size_t>(n, 1) * 8),
              cudaSuccess);
    cudaMemcpy(d_state, state.data(), state.size() * 8, cudaMemcpyHostToDevice);
    cudaMemcpy(d_keys, keys.data(), n * 8, cudaMemcpyHostToDevice);
    const Status status =
        IntegerLookupCuda(d_state, static_cast<int64_t>(state.size()), max_tokens, d_keys,
                          static_cast<int64_t>(n), insert, d_ids, nullptr);
    EXPECT_TRUE(status.ok()) << status.message();
    std::vector<int64_t> ids(n);
    cudaMemcpy(ids.data(), d_ids, n * 8, cudaMemcpyDeviceToHost);
    cudaMemcpy(state.data(), d_state, state.size() * 8, cudaMemcpyDeviceToHost);
    cudaFree(d_state);
    cudaFree(d_keys);
    cudaFree(d_ids);
    return ids;
  }
};

TEST_F(IntegerLookupCudaTest, ManyThreadsInsertingTheSameKeysGiveOneIdEach) {
  for (int64_t max_tokens : {5000, 100}) {
    std::vector<int64_t> state(IntegerLookupStateSize(max_tokens));
    InitIntegerLookupState(state.data(), max_tokens);
    std::vector<int64_t> keys;
    for (int copy = 0; copy < 8; ++copy) {
      for (int64_t k = 0; k < 3000; ++k) keys.push_back(k * 7919 + 3);
    }
    std::shuffle(keys.begin(), keys.end(), std::mt19937(1));
    const auto ids = Lookup(state, max_tokens, keys, true);
    ExpectConsistentIds({keys}, {ids}, state[0], max_tokens);
    EXPECT_EQ(state[0], std::min<int64_t>(max_tokens, 3000));
  }
}

TEST_F(IntegerLookupCudaTest, StateIsInterchangeableWithTheCpuVersion) {
  constexpr int64_t kMaxTokens = 64;
  std::vector<int64_t> state(IntegerLookupStateSize(kMaxTokens));
  InitIntegerLookupState(state.data(), kMaxTokens);
  const std::vector<int64_t> keys = {10, 20, 30, -1};
  std::vector<int64_t> cpu_ids(keys.size());
  ASSERT_TRUE(IntegerLookupCpu(state.data(), static_cast<int64_t>(state.size()), kMaxTokens,
                               keys.data(), 4, true, cpu_ids.data())
                  .ok());
  EXPECT_EQ(cpu_ids, Lookup(state, kMaxTokens, keys, /*insert=*/false));
  EXPECT_EQ((std::vector<int64_t>{0, 2}), Lookup(state, kMaxTokens, {99, 20}, false));
}

}  // namespace
}  // namespace distributed_embeddings
