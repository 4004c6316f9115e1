// The runtime stub of hermetic CUDA builds: it finds the real libcudart.so.12 (here the
// toolchain's, through the test's RUNPATH) and forwards to it. A kernel compiled by clang and
// packed by fatbinary (tools/cuda) registers and launches through it: on a GPU it computes the
// right values, without one the launch fails with the runtime's own error instead of crashing.
#include <cuda_runtime_api.h>
#include <dlfcn.h>

#include <string>
#include <vector>

#include "embedding/kernels/cuda_test_util.h"
#include "gtest/gtest.h"
#include "third_party/cuda/cudart_stub_test_kernel.h"

namespace distributed_embeddings {
namespace {

TEST(CudartStubTest, ForwardsToTheRealRuntime) {
  int count = -1;
  const cudaError_t error = cudaGetDeviceCount(&count);
  // The stub's own answer when no runtime loads; anything else came from libcudart.
  EXPECT_NE(error, cudaErrorSharedObjectInitFailed) << cudaGetErrorString(error);
  EXPECT_NE(dlopen("libcudart.so.12", RTLD_NOW | RTLD_NOLOAD), nullptr)
      << "the stub answered without loading libcudart.so.12";
  if (error != cudaSuccess) {
    // No device (or no driver): the runtime says so in words of its own.
    EXPECT_NE(std::string(cudaGetErrorString(error)), "");
  }
}

TEST(CudartStubTest, KernelRunsOnAGpuAndFailsCleanlyWithout) {
  int count = 0;
  const bool have_device = cudaGetDeviceCount(&count) == cudaSuccess && count > 0;
  if (!have_device) {
    ASSERT_FALSE(testing::GpuExpected())
        << "a GPU is present (or DE_REQUIRE_GPU=1) but CUDA cannot use it";
    // The launch reaches the runtime, which refuses it; nothing is written anywhere.
    EXPECT_NE(LaunchFill(nullptr, 1000, 5, nullptr), cudaSuccess);
    return;
  }
  constexpr int kCount = 1000;
  int* device = nullptr;
  ASSERT_EQ(cudaMalloc(reinterpret_cast<void**>(&device), kCount * sizeof(int)), cudaSuccess);
  ASSERT_EQ(LaunchFill(device, kCount, 5, nullptr), cudaSuccess);
  std::vector<int> host(kCount, -1);
  ASSERT_EQ(cudaMemcpy(host.data(), device, kCount * sizeof(int), cudaMemcpyDeviceToHost),
            cudaSuccess);
  ASSERT_EQ(cudaFree(device), cudaSuccess);
  for (int i = 0; i < kCount; ++i) ASSERT_EQ(host[i], 5 + i) << "at " << i;
}

}  // namespace
}  // namespace distributed_embeddings
