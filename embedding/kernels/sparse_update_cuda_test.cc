// Tests of the CUDA sparse optimizer updates against the CPU kernel (itself tested against a
// double-precision reference in sparse_update_test.cc). Every case skips when no CUDA device is
// present, and runs in full on a GPU machine.
#include "embedding/kernels/sparse_update_cuda.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "embedding/kernels/cuda_test_util.h"
#include "embedding/kernels/sparse_update.h"
#include "gtest/gtest.h"

namespace distributed_embeddings {
namespace {

template <typename U>
U* ToDevice(const std::vector<U>& host) {
  U* device = nullptr;
  EXPECT_EQ(
      cudaMalloc(reinterpret_cast<void**>(&device), std::max<size_t>(host.size(), 1) * sizeof(U)),
      cudaSuccess);
  EXPECT_EQ(cudaMemcpy(device, host.data(), host.size() * sizeof(U), cudaMemcpyHostToDevice),
            cudaSuccess);
  return device;
}

template <typename U>
std::vector<U> ToHost(const U* device, size_t count) {
  std::vector<U> host(count);
  EXPECT_EQ(cudaMemcpy(host.data(), device, count * sizeof(U), cudaMemcpyDeviceToHost),
            cudaSuccess);
  return host;
}

struct Case {
  int64_t rows, width;
  std::vector<float> weights, slot0, slot1, grad;
  std::vector<int64_t> indices;
};

Case MakeCase(SparseRule rule, int64_t rows, int64_t width, int64_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> value(-1, 1), positive(0.05f, 1);
  std::uniform_int_distribution<int64_t> row(0, rows - 1);
  Case c{rows, width, {}, {}, {}, {}, {}};
  for (int64_t i = 0; i < rows * width; ++i) c.weights.push_back(value(rng));
  const int64_t slot_size = SparseRuleSlotsPerRow(rule) ? rows : rows * width;
  for (int64_t i = 0; i < slot_size; ++i) {
    c.slot0.push_back(rule == SparseRule::kLazyAdam ? value(rng) : positive(rng));
    c.slot1.push_back(positive(rng) * 0.01f);
  }
  for (int64_t j = 0; j < n; ++j) c.indices.push_back(row(rng));
  for (int64_t i = 0; i < n * width; ++i) c.grad.push_back(value(rng));
  return c;
}

SparseHyper<float> Hyper() {
  SparseHyper<float> h;
  h.learning_rate = 0.05f;
  h.epsilon = 1e-7f;
  h.one_minus_beta1 = 0.1f;
  h.one_minus_beta2 = 0.001f;
  return h;
}

// Runs the CUDA update on a copy of `c`; returns its status and leaves the results in `out`.
Status RunCuda(SparseRule rule, const Case& c, Case* out) {
  float* weights = ToDevice(c.weights);
  float* slot0 = ToDevice(c.slot0);
  float* slot1 = ToDevice(c.slot1);
  float* grad = ToDevice(c.grad);
  int64_t* indices = ToDevice(c.indices);
  const int64_t n = static_cast<int64_t>(c.indices.size());
  const size_t bytes = SparseUpdateCudaWorkspaceBytes<float, int64_t>(n);
  void* workspace = nullptr;
  EXPECT_EQ(cudaMalloc(&workspace, std::max<size_t>(bytes, 1)), cudaSuccess);
  SparseTable<float> table;
  table.weights = weights;
  table.num_rows = c.rows;
  table.width = c.width;
  table.slots[0] = slot0;
  table.slots[1] = slot1;
  const Status status =
      SparseUpdateCuda(rule, Hyper(), table, indices, n, grad, workspace, bytes, nullptr);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  *out = c;
  out->weights = ToHost(weights, c.weights.size());
  out->slot0 = ToHost(slot0, c.slot0.size());
  out->slot1 = ToHost(slot1, c.slot1.size());
  for (void* p : {static_cast<void*>(weights), static_cast<void*>(slot0), static_cast<void*>(slot1),
                  static_cast<void*>(grad), static_cast<void*>(indices), workspace}) {
    cudaFree(p);
  }
  return status;
}

class SparseUpdateCudaTest : public ::testing::Test {
 protected:
  void SetUp() override { DE_SKIP_OR_FAIL_WITHOUT_CUDA(); }
};

TEST_F(SparseUpdateCudaTest, MatchesTheCpuKernel) {
  for (SparseRule rule : {SparseRule::kSgd, SparseRule::kAdagrad, SparseRule::kRowwiseAdagrad,
                          SparseRule::kLazyAdam}) {
    for (int64_t width : {1, 7, 32, 64, 130}) {
      for (int64_t rows : {40, 5000}) {  // many repeats, mostly distinct
        SCOPED_TRACE("rule " + std::to_string(static_cast<int>(rule)) + " width " +
                     std::to_string(width) + " rows " + std::to_string(rows));
        const Case c = MakeCase(rule, rows, width, 300, 3);
        Case cpu = c, gpu;
        SparseTable<float> table;
        table.weights = cpu.weights.data();
        table.num_rows = rows;
        table.width = width;
        table.slots[0] = cpu.slot0.data();
        table.slots[1] = cpu.slot1.data();
        ASSERT_TRUE(
            SparseUpdateCpu(rule, Hyper(), table, cpu.indices.data(), 300, cpu.grad.data()).ok());
        const Status status = RunCuda(rule, c, &gpu);
        ASSERT_TRUE(status.ok()) << status.message();
        // Sums run in the same order on both; only row-wise Adagrad's mean is reduced differently.
        const float tolerance = rule == SparseRule::kRowwiseAdagrad ? 1e-5f : 0.0f;
        for (size_t i = 0; i < cpu.weights.size(); ++i) {
          ASSERT_NEAR(cpu.weights[i], gpu.weights[i], tolerance * (1 + std::fabs(cpu.weights[i])))
              << i;
        }
        for (size_t i = 0; i < cpu.slot0.size(); ++i) {
          ASSERT_NEAR(cpu.slot0[i], gpu.slot0[i], tolerance * (1 + std::fabs(cpu.slot0[i]))) << i;
          ASSERT_NEAR(cpu.slot1[i], gpu.slot1[i], tolerance * (1 + std::fabs(cpu.slot1[i]))) << i;
        }
      }
    }
  }
}

TEST_F(SparseUpdateCudaTest, BadIndexIsTheCpuErrorAndWritesNothing) {
  Case c = MakeCase(SparseRule::kAdagrad, 50, 8, 20, 4);
  c.indices[11] = 50;
  c.indices[15] = -3;
  Case gpu;
  const Status status = RunCuda(SparseRule::kAdagrad, c, &gpu);
  ASSERT_EQ(status.code(), Status::Code::kInvalidArgument);
  EXPECT_EQ(status.message(), "'indices' must lie in [0, 50); got indices[11] = 50.");
  EXPECT_EQ(c.weights, gpu.weights);
  EXPECT_EQ(c.slot0, gpu.slot0);
}

TEST_F(SparseUpdateCudaTest, EmptyGradientIsANoOp) {
  Case c = MakeCase(SparseRule::kSgd, 10, 4, 0, 5);
  Case gpu;
  EXPECT_TRUE(RunCuda(SparseRule::kSgd, c, &gpu).ok());
  EXPECT_EQ(c.weights, gpu.weights);
}

}  // namespace
}  // namespace distributed_embeddings
