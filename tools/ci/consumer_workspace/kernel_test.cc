// A consumer's C++ test: links the kernel library through its public target.
#include <cstdint>
#include <vector>

#include "embedding/kernels/embedding_lookup.h"
#include "gtest/gtest.h"

namespace {

namespace de = ::distributed_embeddings;

TEST(ConsumerTest, MeanOfOneBag) {
  const std::vector<float> params = {1, 2, 3, 4, 5, 6};  // 3 rows of width 2
  const std::vector<int64_t> ids = {0, 2};
  const std::vector<int64_t> splits = {0, 2};
  const de::CsrIds<int64_t, int64_t> csr{ids.data(), 2, splits.data(), 1};
  std::vector<float> out(2);
  ASSERT_TRUE(de::PooledLookupForwardCpu(params.data(), 3, 2, csr, de::Combiner::kMean,
                                         de::BoundsCheck::kError, out.data())
                  .ok());
  EXPECT_EQ(out, (std::vector<float>{3, 4}));
}

TEST(ConsumerTest, IdOutsideTheTableIsAnError) {
  const std::vector<float> params(4, 1.0f);
  const std::vector<int64_t> ids = {2};
  const std::vector<int64_t> splits = {0, 1};
  const de::CsrIds<int64_t, int64_t> csr{ids.data(), 1, splits.data(), 1};
  std::vector<float> out(2);
  EXPECT_EQ(de::PooledLookupForwardCpu(params.data(), 2, 2, csr, de::Combiner::kSum,
                                       de::BoundsCheck::kError, out.data())
                .code(),
            de::Status::Code::kInvalidArgument);
}

}  // namespace
