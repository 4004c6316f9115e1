// Tests of the CUDA kernels against the same double-precision reference as the CPU suite. Every
// case skips when no CUDA device is present, and runs in full on a GPU machine.
#include <cuda_runtime_api.h>

#include <cstdint>
#include <vector>

#include "embedding/kernels/embedding_lookup_cuda.h"
#include "embedding/kernels/lookup_test_util.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace distributed_embeddings {
namespace {

using ::distributed_embeddings::testing::CaseSpec;
using ::distributed_embeddings::testing::ExpectNear;
using ::distributed_embeddings::testing::ExpectSparseGradient;
using ::distributed_embeddings::testing::MakeCase;
using ::distributed_embeddings::testing::ReferenceForward;
using ::distributed_embeddings::testing::StandardSpecs;
using ::testing::HasSubstr;

// A device copy of a host vector, freed with the object.
template <typename U>
class DeviceBuffer {
 public:
  explicit DeviceBuffer(size_t count) : count_(count) {
    EXPECT_EQ(cudaMalloc(reinterpret_cast<void**>(&ptr_), std::max<size_t>(count, 1) * sizeof(U)), cudaSuccess);
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
  void SetUp() override {
    if (!CudaDeviceAvailable()) GTEST_SKIP() << "no CUDA device";
  }
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

template <typename P>
void CheckForwardAndBackward(double invalid_fraction, BoundsCheck mode) {
  using T = typename P::T;
  using IdT = typename P::IdT;
  using OffsetT = typename P::OffsetT;
  for (const CaseSpec& spec : StandardSpecs(invalid_fraction)) {
    const auto c = MakeCase<T, IdT, OffsetT>(spec);
    DeviceBuffer<T> params(c.params), grad_output(c.grad_output);
    DeviceBuffer<IdT> ids(c.ids);
    DeviceBuffer<OffsetT> splits(c.row_splits);
    const CsrIds<IdT, OffsetT> csr{ids.get(), static_cast<int64_t>(c.ids.size()), splits.get(),
                                   c.batch()};
    for (Combiner combiner : {Combiner::kSum, Combiner::kMean}) {
      SCOPED_TRACE(::testing::Message() << "seed " << spec.seed << " combiner "
                                        << static_cast<int>(combiner));
      DeviceBuffer<T> output(c.batch() * c.width);
      DeviceBuffer<char> validation(ValidationWorkspaceBytes());
      ASSERT_TRUE(PooledLookupForwardCuda(params.get(), c.num_rows, c.width, csr, combiner, mode,
                                          output.get(), validation.get(),
                                          ValidationWorkspaceBytes(), nullptr)
                      .ok());
      ExpectNear(ReferenceForward(c, combiner), output.ToHost(), spec.max_hotness);

      const int64_t capacity = MaxUniqueIds(csr.nnz, c.num_rows);
      DeviceBuffer<IdT> unique_ids(capacity);
      DeviceBuffer<T> unique_grad(capacity * c.width);
      const size_t bytes =
          PooledLookupBackwardCudaWorkspaceBytes<T, IdT, OffsetT>(csr.nnz, csr.batch);
      DeviceBuffer<char> workspace(bytes);
      int64_t num_unique = -1;
      const Status status = PooledLookupBackwardCuda(
          grad_output.get(), c.num_rows, c.width, csr, combiner, mode, unique_ids.get(),
          unique_grad.get(), &num_unique, workspace.get(), bytes, nullptr);
      ASSERT_TRUE(status.ok()) << status.message();
      ExpectSparseGradient(c, combiner, unique_ids.ToHost(num_unique),
                           unique_grad.ToHost(num_unique * c.width), num_unique,
                           spec.max_hotness);
    }
  }
}

TYPED_TEST(LookupCudaTest, ForwardAndBackwardMatchReference) {
  CheckForwardAndBackward<TypeParam>(0.0, BoundsCheck::kError);
}

TYPED_TEST(LookupCudaTest, SkipModeIgnoresInvalidIds) {
  CheckForwardAndBackward<TypeParam>(0.2, BoundsCheck::kSkip);
}

class LookupCudaErrorTest : public CudaTest {
 protected:
  void ExpectRejected(const std::vector<int64_t>& host_ids,
                      const std::vector<int64_t>& host_splits, const std::string& message) {
    DeviceBuffer<float> params(std::vector<float>(8, 1.0f));
    DeviceBuffer<int64_t> ids(host_ids), splits(host_splits);
    const int64_t batch = static_cast<int64_t>(host_splits.size()) - 1;
    const CsrIds<int64_t, int64_t> csr{ids.get(), static_cast<int64_t>(host_ids.size()),
                                       splits.get(), batch};
    DeviceBuffer<float> output(std::vector<float>(2 * batch, 42.0f));
    DeviceBuffer<char> validation(ValidationWorkspaceBytes());
    const Status status =
        PooledLookupForwardCuda(params.get(), 4, 2, csr, Combiner::kSum, BoundsCheck::kError,
                                output.get(), validation.get(), ValidationWorkspaceBytes(),
                                nullptr);
    EXPECT_EQ(status.code(), Status::Code::kInvalidArgument);
    EXPECT_THAT(status.message(), HasSubstr(message));
    for (float v : output.ToHost()) EXPECT_EQ(v, 42.0f);
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

}  // namespace
}  // namespace distributed_embeddings
