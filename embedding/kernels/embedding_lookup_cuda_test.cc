// Tests of the CUDA kernels against the same double-precision reference as the CPU suite. Every
// case skips when no CUDA device is present, and runs in full on a GPU machine.
#include "embedding/kernels/embedding_lookup_cuda.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "embedding/kernels/cuda_test_util.h"
#include "embedding/kernels/embedding_lookup.h"
#include "embedding/kernels/half_test_util.h"
#include "embedding/kernels/lookup_test_util.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace distributed_embeddings {
namespace {

using ::distributed_embeddings::testing::CaseSpec;
using ::distributed_embeddings::testing::ExpectNear;
using ::distributed_embeddings::testing::ExpectSparseGradient;
using ::distributed_embeddings::testing::MakeCase;
using ::distributed_embeddings::testing::ReferenceBackward;
using ::distributed_embeddings::testing::ReferenceForward;
using ::distributed_embeddings::testing::StandardSpecs;
using ::testing::HasSubstr;

// A device copy of a host vector, freed with the object.
template <typename U>
class DeviceBuffer {
 public:
  explicit DeviceBuffer(size_t count) : count_(count) {
    EXPECT_EQ(cudaMalloc(reinterpret_cast<void**>(&ptr_), std::max<size_t>(count, 1) * sizeof(U)),
              cudaSuccess);
  }
  explicit DeviceBuffer(const std::vector<U>& host) : DeviceBuffer(host.size()) {
    EXPECT_EQ(cudaMemcpy(ptr_, host.data(), host.size() * sizeof(U), cudaMemcpyHostToDevice),
              cudaSuccess);
  }
  ~DeviceBuffer() { cudaFree(ptr_); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  U* get() const { return ptr_; }
  std::vector<U> ToHost(size_t count) const {
    std::vector<U> host(count);
    EXPECT_EQ(cudaMemcpy(host.data(), ptr_, count * sizeof(U), cudaMemcpyDeviceToHost),
              cudaSuccess);
    return host;
  }
  std::vector<U> ToHost() const { return ToHost(count_); }

 private:
  U* ptr_ = nullptr;
  size_t count_;
};

class CudaTest : public ::testing::Test {
 protected:
  void SetUp() override { DE_SKIP_OR_FAIL_WITHOUT_CUDA(); }
};

template <typename T_, typename IdT_, typename OffsetT_>
struct Types {
  using T = T_;
  using IdT = IdT_;
  using OffsetT = OffsetT_;
};

template <typename P>
class LookupCudaTest : public CudaTest {};

using AllTypes = ::testing::Types<Types<float, int32_t, int32_t>, Types<float, int64_t, int64_t>,
                                  Types<float, int32_t, int64_t>, Types<double, int64_t, int64_t>>;
TYPED_TEST_SUITE(LookupCudaTest, AllTypes);

// The CUDA backward on device inputs, its results copied back: unique ids and their rows.
template <typename T, typename IdT, typename OffsetT>
struct CudaGradient {
  Status status;
  std::vector<IdT> ids;
  std::vector<T> rows;
};

template <typename T, typename IdT, typename OffsetT>
CudaGradient<T, IdT, OffsetT> CudaBackward(const T* grad_output, int64_t num_rows, int64_t width,
                                           const CsrIds<IdT, OffsetT>& csr, Combiner combiner,
                                           BoundsCheck mode, cudaStream_t stream,
                                           const T* weights = nullptr) {
  const int64_t capacity = MaxUniqueIds(csr.nnz, num_rows);
  DeviceBuffer<IdT> unique_ids(capacity);
  DeviceBuffer<T> unique_grad(capacity * width);
  const size_t bytes = PooledLookupBackwardCudaWorkspaceBytes<T, IdT, OffsetT>(csr.nnz, csr.batch);
  DeviceBuffer<char> workspace(bytes);
  int64_t num_unique = 0;
  CudaGradient<T, IdT, OffsetT> result;
  result.status =
      weights != nullptr
          ? WeightedPooledLookupBackwardCuda(grad_output, num_rows, width, csr, weights, combiner,
                                             mode, unique_ids.get(), unique_grad.get(), &num_unique,
                                             workspace.get(), bytes, stream)
          : PooledLookupBackwardCuda(grad_output, num_rows, width, csr, combiner, mode,
                                     unique_ids.get(), unique_grad.get(), &num_unique,
                                     workspace.get(), bytes, stream);
  EXPECT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  if (result.status.ok()) {
    result.ids = unique_ids.ToHost(num_unique);
    result.rows = unique_grad.ToHost(num_unique * width);
  }
  return result;
}

template <typename P>
void CheckForwardAndBackward(double invalid_fraction, BoundsCheck mode) {
  using T = typename P::T;
  using IdT = typename P::IdT;
  using OffsetT = typename P::OffsetT;
  for (const CaseSpec& spec : StandardSpecs(invalid_fraction)) {
    const auto c = MakeCase<T, IdT, OffsetT>(spec);
    DeviceBuffer<T> params(c.params), grad_output(c.grad_output), weights(c.weights);
    DeviceBuffer<IdT> ids(c.ids);
    DeviceBuffer<OffsetT> splits(c.row_splits);
    const CsrIds<IdT, OffsetT> csr{ids.get(), static_cast<int64_t>(c.ids.size()), splits.get(),
                                   c.batch()};
    for (Combiner combiner : {Combiner::kSum, Combiner::kMean, Combiner::kSqrtn}) {
      for (bool weighted : {false, true}) {
        SCOPED_TRACE(::testing::Message()
                     << "seed " << spec.seed << " combiner " << static_cast<int>(combiner)
                     << " weighted " << weighted);
        const T* w = weighted ? weights.get() : nullptr;
        DeviceBuffer<T> output(c.batch() * c.width);
        DeviceBuffer<char> validation(ValidationWorkspaceBytes());
        const Status forward =
            weighted ? WeightedPooledLookupForwardCuda(
                           params.get(), c.num_rows, c.width, csr, w, combiner, mode, output.get(),
                           validation.get(), ValidationWorkspaceBytes(), nullptr)
                     : PooledLookupForwardCuda(params.get(), c.num_rows, c.width, csr, combiner,
                                               mode, output.get(), validation.get(),
                                               ValidationWorkspaceBytes(), nullptr);
        ASSERT_TRUE(forward.ok());
        ExpectNear(ReferenceForward(c, combiner, weighted), output.ToHost(), spec.max_hotness);

        const auto gradient =
            CudaBackward(grad_output.get(), c.num_rows, c.width, csr, combiner, mode, nullptr, w);
        ASSERT_TRUE(gradient.status.ok()) << gradient.status.message();
        const int64_t num_unique = static_cast<int64_t>(gradient.ids.size());
        EXPECT_TRUE(std::is_sorted(gradient.ids.begin(), gradient.ids.end()))
            << "the CUDA backward documents ascending unique ids";
        ExpectSparseGradient(c, combiner, gradient.ids, gradient.rows, num_unique, spec.max_hotness,
                             weighted);
      }
    }
  }
}

TYPED_TEST(LookupCudaTest, ForwardAndBackwardMatchReference) {
  CheckForwardAndBackward<TypeParam>(0.0, BoundsCheck::kError);
}

TYPED_TEST(LookupCudaTest, SkipModeIgnoresInvalidIds) {
  CheckForwardAndBackward<TypeParam>(0.2, BoundsCheck::kSkip);
}

// The CUDA and CPU kernels on the same case, on a stream of its own (as TensorFlow gives an op):
// the same unique ids (as sets: CUDA sorts them) and the same numbers within rounding.
TYPED_TEST(LookupCudaTest, MatchesTheCpuKernelsOnANonDefaultStream) {
  using T = typename TypeParam::T;
  using IdT = typename TypeParam::IdT;
  using OffsetT = typename TypeParam::OffsetT;
  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);
  for (const CaseSpec& spec : StandardSpecs(0.1)) {
    const auto c = MakeCase<T, IdT, OffsetT>(spec);
    const CsrIds<IdT, OffsetT> host_csr{c.ids.data(), static_cast<int64_t>(c.ids.size()),
                                        c.row_splits.data(), c.batch()};
    DeviceBuffer<T> params(c.params), grad_output(c.grad_output);
    DeviceBuffer<IdT> ids(c.ids);
    DeviceBuffer<OffsetT> splits(c.row_splits);
    const CsrIds<IdT, OffsetT> csr{ids.get(), host_csr.nnz, splits.get(), c.batch()};
    for (Combiner combiner : {Combiner::kSum, Combiner::kMean}) {
      SCOPED_TRACE(::testing::Message() << "seed " << spec.seed);
      std::vector<T> cpu_output(c.batch() * c.width);
      ASSERT_TRUE(PooledLookupForwardCpu(c.params.data(), c.num_rows, c.width, host_csr, combiner,
                                         BoundsCheck::kSkip, cpu_output.data())
                      .ok());
      DeviceBuffer<T> output(c.batch() * c.width);
      DeviceBuffer<char> validation(ValidationWorkspaceBytes());
      ASSERT_TRUE(PooledLookupForwardCuda(params.get(), c.num_rows, c.width, csr, combiner,
                                          BoundsCheck::kSkip, output.get(), validation.get(),
                                          ValidationWorkspaceBytes(), stream)
                      .ok());
      ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
      std::vector<double> cpu_forward(cpu_output.begin(), cpu_output.end());
      ExpectNear(cpu_forward, output.ToHost(), spec.max_hotness);

      const int64_t capacity = MaxUniqueIds(host_csr.nnz, c.num_rows);
      std::vector<IdT> cpu_ids(capacity);
      std::vector<T> cpu_grad(capacity * c.width);
      int64_t cpu_unique = -1;
      ASSERT_TRUE(PooledLookupBackwardCpu(c.grad_output.data(), c.num_rows, c.width, host_csr,
                                          combiner, BoundsCheck::kSkip, cpu_ids.data(),
                                          cpu_grad.data(), &cpu_unique)
                      .ok());
      const auto gradient = CudaBackward(grad_output.get(), c.num_rows, c.width, csr, combiner,
                                         BoundsCheck::kSkip, stream);
      ASSERT_TRUE(gradient.status.ok()) << gradient.status.message();
      ASSERT_EQ(static_cast<int64_t>(gradient.ids.size()), cpu_unique);
      const std::vector<IdT>& gpu_ids = gradient.ids;
      const std::vector<T>& gpu_grad = gradient.rows;
      // Row of each CPU id in the GPU's (sorted) output.
      std::vector<double> cpu_rows, gpu_rows;
      for (int64_t u = 0; u < cpu_unique; ++u) {
        const auto at = std::lower_bound(gpu_ids.begin(), gpu_ids.end(), cpu_ids[u]);
        ASSERT_TRUE(at != gpu_ids.end() && *at == cpu_ids[u]) << "id " << cpu_ids[u];
        const int64_t g = at - gpu_ids.begin();
        for (int64_t w = 0; w < c.width; ++w) {
          cpu_rows.push_back(cpu_grad[u * c.width + w]);
          gpu_rows.push_back(gpu_grad[g * c.width + w]);
        }
      }
      ExpectNear(cpu_rows, std::vector<T>(gpu_rows.begin(), gpu_rows.end()), c.batch());
    }
  }
  cudaStreamDestroy(stream);
}

TEST_F(CudaTest, EmptyTablesZeroWidthAndAllInvalidIds) {
  // num_rows 0 (every id invalid, skipped), width 0, and empty bags: zeros and no unique ids.
  const std::vector<int64_t> host_ids = {0, 3, -1};
  DeviceBuffer<int64_t> ids(host_ids);
  DeviceBuffer<int64_t> splits(std::vector<int64_t>{0, 0, 3});
  const CsrIds<int64_t, int64_t> csr{ids.get(), 3, splits.get(), 2};
  DeviceBuffer<float> params(1);
  DeviceBuffer<char> validation(ValidationWorkspaceBytes());
  for (const int64_t width : {int64_t{0}, int64_t{3}}) {
    DeviceBuffer<float> output(std::vector<float>(2 * width + 1, 42.0f));
    ASSERT_TRUE(PooledLookupForwardCuda(params.get(), 0, width, csr, Combiner::kMean,
                                        BoundsCheck::kSkip, output.get(), validation.get(),
                                        ValidationWorkspaceBytes(), nullptr)
                    .ok());
    const std::vector<float> host = output.ToHost();
    for (int64_t i = 0; i < 2 * width; ++i) EXPECT_EQ(host[i], 0.0f) << i;
    EXPECT_EQ(host[2 * width], 42.0f);  // nothing written past the output
    const size_t bytes = PooledLookupBackwardCudaWorkspaceBytes<float, int64_t, int64_t>(3, 2);
    DeviceBuffer<char> workspace(bytes);
    DeviceBuffer<float> grad(std::vector<float>(2 * width + 1, 1.0f));
    DeviceBuffer<int64_t> unique_ids(3);
    DeviceBuffer<float> unique_grad(3 * width + 1);
    int64_t num_unique = -1;
    ASSERT_TRUE(PooledLookupBackwardCuda(grad.get(), 0, width, csr, Combiner::kSum,
                                         BoundsCheck::kSkip, unique_ids.get(), unique_grad.get(),
                                         &num_unique, workspace.get(), bytes, nullptr)
                    .ok());
    EXPECT_EQ(num_unique, 0);
    EXPECT_EQ(PooledLookupBackwardCuda(grad.get(), 0, width, csr, Combiner::kSum,
                                       BoundsCheck::kError, unique_ids.get(), unique_grad.get(),
                                       &num_unique, workspace.get(), bytes, nullptr)
                  .code(),
              Status::Code::kInvalidArgument);
  }
}

TEST_F(CudaTest, Int32OffsetsPastTheirLimitAreRejectedBeforeAnyRead) {
  // nnz one past INT32_MAX with int32 row_splits: rejected from the sizes alone, so the
  // pointers (null here) are never read.
  const CsrIds<int32_t, int32_t> csr{nullptr, int64_t{1} << 31, nullptr, 1};
  DeviceBuffer<char> validation(ValidationWorkspaceBytes());
  const Status status = PooledLookupForwardCuda(
      static_cast<const float*>(nullptr), 10, 4, csr, Combiner::kSum, BoundsCheck::kError,
      static_cast<float*>(nullptr), validation.get(), ValidationWorkspaceBytes(), nullptr);
  EXPECT_EQ(status.code(), Status::Code::kInvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("32-bit row_splits"));
}

class LookupCudaErrorTest : public CudaTest {
 protected:
  void ExpectRejected(const std::vector<int64_t>& host_ids, const std::vector<int64_t>& host_splits,
                      const std::string& message) {
    DeviceBuffer<float> params(std::vector<float>(8, 1.0f));
    DeviceBuffer<int64_t> ids(host_ids), splits(host_splits);
    const int64_t batch = static_cast<int64_t>(host_splits.size()) - 1;
    const CsrIds<int64_t, int64_t> csr{ids.get(), static_cast<int64_t>(host_ids.size()),
                                       splits.get(), batch};
    DeviceBuffer<float> output(std::vector<float>(2 * batch, 42.0f));
    DeviceBuffer<char> validation(ValidationWorkspaceBytes());
    const Status status = PooledLookupForwardCuda(
        params.get(), 4, 2, csr, Combiner::kSum, BoundsCheck::kError, output.get(),
        validation.get(), ValidationWorkspaceBytes(), nullptr);
    EXPECT_EQ(status.code(), Status::Code::kInvalidArgument);
    EXPECT_THAT(status.message(), HasSubstr(message));
    for (float v : output.ToHost()) EXPECT_EQ(v, 42.0f);
    // The backward rejects the same input with the same message and writes nothing.
    const int64_t nnz = static_cast<int64_t>(host_ids.size());
    const size_t bytes =
        PooledLookupBackwardCudaWorkspaceBytes<float, int64_t, int64_t>(nnz, batch);
    DeviceBuffer<char> workspace(bytes);
    DeviceBuffer<float> grad(std::vector<float>(2 * batch, 1.0f));
    DeviceBuffer<int64_t> unique_ids(std::vector<int64_t>(nnz + 1, 42));
    DeviceBuffer<float> unique_grad(std::vector<float>(2 * nnz + 1, 42.0f));
    int64_t num_unique = -1;
    const Status backward = PooledLookupBackwardCuda(
        grad.get(), 4, 2, csr, Combiner::kSum, BoundsCheck::kError, unique_ids.get(),
        unique_grad.get(), &num_unique, workspace.get(), bytes, nullptr);
    EXPECT_EQ(backward.code(), Status::Code::kInvalidArgument);
    EXPECT_THAT(backward.message(), HasSubstr(message));
    for (int64_t v : unique_ids.ToHost()) EXPECT_EQ(v, 42);
    for (float v : unique_grad.ToHost()) EXPECT_EQ(v, 42.0f);
  }
};

TEST_F(LookupCudaErrorTest, RejectsIdPastVocabulary) {
  ExpectRejected({0, 4, 1}, {0, 2, 3}, "got ids[1] = 4.");
}

TEST_F(LookupCudaErrorTest, RejectsNegativeId) {
  ExpectRejected({0, 1, -1}, {0, 2, 3}, "got ids[2] = -1.");
}

TEST_F(LookupCudaErrorTest, RejectsMalformedRowSplits) {
  ExpectRejected({0, 1, 2}, {1, 2, 3}, "'row_splits' must start at 0");
  ExpectRejected({0, 1, 2}, {0, 2, 1, 3}, "got row_splits[1] = 2 > row_splits[2] = 1.");
  ExpectRejected({0, 1, 2}, {0, 1, 5}, "'row_splits' must end at 3");
}

TEST_F(LookupCudaErrorTest, ReportsRowSplitsErrorsInTheCpuOrder) {
  // Decreasing and ending wrong at once: the CPU reports the decrease first, and so must we.
  ExpectRejected({0, 1, 2}, {0, 2, 1, 5}, "got row_splits[1] = 2 > row_splits[2] = 1.");
  // Starting wrong and decreasing: the start first.
  ExpectRejected({0, 1, 2}, {1, 0, 3}, "'row_splits' must start at 0; got row_splits[0] = 1.");
}

// int32 ids with num_rows past INT32_MAX: every non-negative id is valid, and the invalid-id
// sentinel of the sort must not collide with one (it did: num_rows cast to int32 wrapped).
TEST_F(CudaTest, Int32IdsWithMoreRowsThanInt32SkipsOnlyInvalidIds) {
  for (const int64_t num_rows : {int64_t{1} << 31, (int64_t{1} << 32) + 5}) {
    const std::vector<int32_t> host_ids = {-1, 2147483647, 5, -3, 5, 0};
    DeviceBuffer<int32_t> ids(host_ids);
    DeviceBuffer<int64_t> splits(std::vector<int64_t>{0, 3, 6});
    const CsrIds<int32_t, int64_t> csr{ids.get(), 6, splits.get(), 2};
    const size_t bytes = PooledLookupBackwardCudaWorkspaceBytes<float, int32_t, int64_t>(6, 2);
    DeviceBuffer<char> workspace(bytes);
    DeviceBuffer<float> grad(std::vector<float>(2, 1.0f));  // width 0: nothing is read
    DeviceBuffer<int32_t> unique_ids(6);
    DeviceBuffer<float> unique_grad(1);
    int64_t num_unique = -1;
    const Status status = PooledLookupBackwardCuda(
        grad.get(), num_rows, 0, csr, Combiner::kSum, BoundsCheck::kSkip, unique_ids.get(),
        unique_grad.get(), &num_unique, workspace.get(), bytes, nullptr);
    ASSERT_TRUE(status.ok()) << status.message();
    ASSERT_EQ(num_unique, 3) << num_rows;
    EXPECT_EQ(unique_ids.ToHost(3), (std::vector<int32_t>{0, 5, 2147483647})) << num_rows;
  }
}

TEST_F(CudaTest, CooToRowSplitsCountsEntriesPerRow) {
  DeviceBuffer<int64_t> indices(std::vector<int64_t>{0, 1, 2, 0, 2, 2, 4, 1});
  DeviceBuffer<int64_t> splits(7);
  DeviceBuffer<char> validation(ValidationWorkspaceBytes());
  ASSERT_TRUE(CooToRowSplitsCuda(indices.get(), 4, 6, 3, splits.get(), validation.get(),
                                 ValidationWorkspaceBytes(), nullptr)
                  .ok());
  EXPECT_EQ(splits.ToHost(), (std::vector<int64_t>{0, 1, 1, 3, 3, 4, 4}));
}

TEST_F(CudaTest, CooToRowSplitsRejectsOutOfOrderAndOutOfBounds) {
  DeviceBuffer<int64_t> splits(3);
  DeviceBuffer<char> validation(ValidationWorkspaceBytes());
  DeviceBuffer<int64_t> unordered(std::vector<int64_t>{1, 0, 0, 2});
  Status status = CooToRowSplitsCuda(unordered.get(), 2, 2, 3, splits.get(), validation.get(),
                                     ValidationWorkspaceBytes(), nullptr);
  EXPECT_THAT(status.message(), HasSubstr("got indices[1] = [0, 2] after [1, 0]"));
  DeviceBuffer<int64_t> outside(std::vector<int64_t>{0, 0, 1, 3});
  status = CooToRowSplitsCuda(outside.get(), 2, 2, 3, splits.get(), validation.get(),
                              ValidationWorkspaceBytes(), nullptr);
  EXPECT_THAT(status.message(), HasSubstr("got indices[1] = [1, 3]"));
}

// Half-precision tables: the CUDA kernels against the double reference, as the CPU suite checks
// them (half_lookup_test.cc).
template <typename T_, typename OutT_>
struct HalfTypes {
  using T = T_;
  using OutT = OutT_;
};

template <typename P>
class HalfLookupCudaTest : public CudaTest {};

using AllHalfTypes = ::testing::Types<HalfTypes<Float16, Float16>, HalfTypes<Float16, float>,
                                      HalfTypes<BFloat16, BFloat16>, HalfTypes<BFloat16, float>>;
TYPED_TEST_SUITE(HalfLookupCudaTest, AllHalfTypes);

TYPED_TEST(HalfLookupCudaTest, ForwardAndBackwardMatchReference) {
  using T = typename TypeParam::T;
  using OutT = typename TypeParam::OutT;
  cudaStream_t stream = nullptr;
  for (const CaseSpec& spec : StandardSpecs(0.1)) {
    const auto c = testing::MakeHalfCase<T, OutT, int64_t, int32_t>(spec);
    const auto& exact = c.exact;
    const int64_t nnz = static_cast<int64_t>(exact.ids.size());
    DeviceBuffer<T> params(c.params);
    DeviceBuffer<int64_t> ids(exact.ids);
    DeviceBuffer<int32_t> splits(exact.row_splits);
    DeviceBuffer<OutT> weights(c.weights);
    DeviceBuffer<OutT> grad(c.grad_output);
    const CsrIds<int64_t, int32_t> csr{ids.get(), nnz, splits.get(), exact.batch()};
    for (Combiner combiner : {Combiner::kSum, Combiner::kMean, Combiner::kSqrtn}) {
      for (bool weighted : {false, true}) {
        SCOPED_TRACE(::testing::Message()
                     << "seed " << spec.seed << " combiner " << static_cast<int>(combiner)
                     << " weighted " << weighted);
        const OutT* w = weighted ? weights.get() : nullptr;
        DeviceBuffer<OutT> output(exact.batch() * exact.width);
        DeviceBuffer<char> validation(ValidationWorkspaceBytes());
        ASSERT_TRUE(HalfPooledLookupForwardCuda(params.get(), exact.num_rows, exact.width, csr, w,
                                                combiner, BoundsCheck::kSkip, output.get(),
                                                validation.get(), ValidationWorkspaceBytes(),
                                                stream)
                        .ok());
        testing::ExpectNearRounded(ReferenceForward(exact, combiner, weighted), output.ToHost(),
                                   spec.max_hotness);

        const int64_t capacity = MaxUniqueIds(nnz, exact.num_rows);
        DeviceBuffer<int64_t> unique_ids(capacity);
        DeviceBuffer<T> unique_grad(capacity * exact.width);
        const size_t bytes =
            PooledLookupBackwardCudaWorkspaceBytes<T, int64_t, int32_t>(nnz, exact.batch());
        DeviceBuffer<char> workspace(bytes);
        int64_t num_unique = -1;
        ASSERT_TRUE(HalfPooledLookupBackwardCuda(grad.get(), exact.num_rows, exact.width, csr, w,
                                                 combiner, BoundsCheck::kSkip, unique_ids.get(),
                                                 unique_grad.get(), &num_unique, workspace.get(),
                                                 bytes, stream)
                        .ok());
        const std::vector<int64_t> host_ids = unique_ids.ToHost(num_unique);
        const std::vector<T> host_rows = unique_grad.ToHost(num_unique * exact.width);
        std::vector<T> dense(exact.num_rows * exact.width, testing::FromDouble<T>(0.0));
        for (int64_t u = 0; u < num_unique; ++u) {
          ASSERT_TRUE(testing::Valid(host_ids[u], exact.num_rows));
          for (int64_t k = 0; k < exact.width; ++k) {
            dense[host_ids[u] * exact.width + k] = host_rows[u * exact.width + k];
          }
        }
        testing::ExpectNearRounded(ReferenceBackward(exact, combiner, weighted), dense, nnz);
      }
    }
  }
}

}  // namespace
}  // namespace distributed_embeddings
