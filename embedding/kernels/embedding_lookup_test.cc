// Tests of the CPU kernels against the naive double-precision reference in lookup_test_util.h.
#include "embedding/kernels/embedding_lookup.h"

#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <limits>
#include <mutex>
#include <numeric>
#include <random>
#include <utility>
#include <vector>

#include "embedding/kernels/lookup_test_util.h"
#include "embedding/kernels/status.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace distributed_embeddings {
namespace {

using ::distributed_embeddings::testing::CaseSpec;
using ::distributed_embeddings::testing::ExpectNear;
using ::distributed_embeddings::testing::ExpectSparseGradient;
using ::distributed_embeddings::testing::ForEachCpuLoopBuild;
using ::distributed_embeddings::testing::MakeCase;
using ::distributed_embeddings::testing::ReferenceForward;
using ::distributed_embeddings::testing::StandardSpecs;
using ::distributed_embeddings::testing::ThreadedParallelFor;
using ::testing::HasSubstr;

template <typename T_, typename IdT_, typename OffsetT_>
struct Types {
  using T = T_;
  using IdT = IdT_;
  using OffsetT = OffsetT_;
};

template <typename P>
class LookupCpuTest : public ::testing::Test {};

using AllTypes = ::testing::Types<Types<float, int32_t, int32_t>, Types<float, int32_t, int64_t>,
                                  Types<float, int64_t, int32_t>, Types<float, int64_t, int64_t>,
                                  Types<double, int32_t, int64_t>, Types<double, int64_t, int64_t>>;
TYPED_TEST_SUITE(LookupCpuTest, AllTypes);

template <typename P>
void CheckForwardAndBackward(double invalid_fraction, BoundsCheck mode) {
  using T = typename P::T;
  using IdT = typename P::IdT;
  using OffsetT = typename P::OffsetT;
  for (const CaseSpec& spec : StandardSpecs(invalid_fraction)) {
    const auto c = MakeCase<T, IdT, OffsetT>(spec);
    for (Combiner combiner : {Combiner::kSum, Combiner::kMean, Combiner::kSqrtn}) {
      for (bool weighted : {false, true}) {
        for (int threads : {1, 3}) {
          SCOPED_TRACE(::testing::Message()
                       << "seed " << spec.seed << " combiner " << static_cast<int>(combiner)
                       << " weighted " << weighted << " threads " << threads);
          const ParallelFor pf = threads > 1 ? ThreadedParallelFor(threads) : ParallelFor();
          std::vector<T> output(c.batch() * c.width, T(-7));
          const Status forward =
              weighted ? WeightedPooledLookupForwardCpu(c.params.data(), c.num_rows, c.width,
                                                        c.Csr(), c.weights.data(), combiner, mode,
                                                        output.data(), pf)
                       : PooledLookupForwardCpu(c.params.data(), c.num_rows, c.width, c.Csr(),
                                                combiner, mode, output.data(), pf);
          ASSERT_TRUE(forward.ok());
          ExpectNear(ReferenceForward(c, combiner, weighted), output, spec.max_hotness);

          const int64_t capacity = MaxUniqueIds(static_cast<int64_t>(c.ids.size()), c.num_rows);
          std::vector<IdT> unique_ids(capacity);
          std::vector<T> unique_grad(capacity * c.width);
          int64_t num_unique = -1;
          const Status backward =
              weighted ? WeightedPooledLookupBackwardCpu(
                             c.grad_output.data(), c.num_rows, c.width, c.Csr(), c.weights.data(),
                             combiner, mode, unique_ids.data(), unique_grad.data(), &num_unique, pf)
                       : PooledLookupBackwardCpu(c.grad_output.data(), c.num_rows, c.width, c.Csr(),
                                                 combiner, mode, unique_ids.data(),
                                                 unique_grad.data(), &num_unique, pf);
          ASSERT_TRUE(backward.ok());
          unique_grad.resize(num_unique * c.width);
          ExpectSparseGradient(c, combiner, unique_ids, unique_grad, num_unique, spec.max_hotness,
                               weighted);
        }
      }
    }
  }
}

TYPED_TEST(LookupCpuTest, ForwardAndBackwardMatchReference) {
  ForEachCpuLoopBuild([] { CheckForwardAndBackward<TypeParam>(0.0, BoundsCheck::kError); });
}

TYPED_TEST(LookupCpuTest, SkipModeIgnoresInvalidIds) {
  ForEachCpuLoopBuild([] { CheckForwardAndBackward<TypeParam>(0.2, BoundsCheck::kSkip); });
}

// The documented summation order (TensorFlow's CPU reduce_sum): in id order, except that a bag of
// at least 16 ids sums its first len / 4 * 4 ids into four interleaved partial sums on the lanes
// that fill whole 32-byte packets, then combines them, then adds the rest in order.
template <typename T>
T EigenOrderSum(const std::vector<T>& terms, int64_t w, int64_t width) {
  const int64_t n = static_cast<int64_t>(terms.size());
  const int64_t packet = 32 / sizeof(T);
  if (n < 16 || w >= width / packet * packet) {
    T sum = T(0);
    for (T t : terms) sum += t;
    return sum;
  }
  T partial[4] = {T(0), T(0), T(0), T(0)};
  const int64_t interleaved = n / 4 * 4;
  for (int64_t j = 0; j < interleaved; ++j) partial[j % 4] += terms[j];
  T sum = partial[0];
  for (int k = 1; k < 4; ++k) sum += partial[k];
  for (int64_t j = interleaved; j < n; ++j) sum += terms[j];
  return sum;
}

TYPED_TEST(LookupCpuTest, SumFollowsTensorFlowReductionOrder) {
  using T = typename TypeParam::T;
  using IdT = typename TypeParam::IdT;
  using OffsetT = typename TypeParam::OffsetT;
  ForEachCpuLoopBuild([] {
    for (int64_t width : {3, 8, 16, 32, 37, 64, 128, 256}) {  // every specialized width too
      const auto c = MakeCase<T, IdT, OffsetT>({200, width, 40, 60, 0.0, 0.0, 77});
      std::vector<T> output(c.batch() * c.width);
      ASSERT_TRUE(PooledLookupForwardCpu(c.params.data(), c.num_rows, c.width, c.Csr(),
                                         Combiner::kSum, BoundsCheck::kError, output.data())
                      .ok());
      for (int64_t b = 0; b < c.batch(); ++b) {
        for (int64_t w = 0; w < c.width; ++w) {
          std::vector<T> terms;
          for (int64_t j = c.row_splits[b]; j < static_cast<int64_t>(c.row_splits[b + 1]); ++j) {
            terms.push_back(c.params[static_cast<int64_t>(c.ids[j]) * c.width + w]);
          }
          ASSERT_EQ(EigenOrderSum(terms, w, c.width), output[b * c.width + w])
              << "width " << width << ", bag " << b << " of length " << terms.size() << ", lane "
              << w;
        }
      }
    }
  });
}

TYPED_TEST(LookupCpuTest, EmptyBagsGiveZerosForBothCombiners) {
  using T = typename TypeParam::T;
  using IdT = typename TypeParam::IdT;
  using OffsetT = typename TypeParam::OffsetT;
  const std::vector<T> params = {1, 2, 3, 4};
  const std::vector<IdT> ids = {1};
  const std::vector<OffsetT> splits = {0, 0, 1, 1};
  const CsrIds<IdT, OffsetT> csr{ids.data(), 1, splits.data(), 3};
  for (Combiner combiner : {Combiner::kSum, Combiner::kMean, Combiner::kSqrtn}) {
    std::vector<T> output(6, T(-1));
    ASSERT_TRUE(PooledLookupForwardCpu(params.data(), 2, 2, csr, combiner, BoundsCheck::kError,
                                       output.data())
                    .ok());
    EXPECT_EQ(output, (std::vector<T>{0, 0, 3, 4, 0, 0}));
  }
}

TYPED_TEST(LookupCpuTest, ZeroWeightBagsGiveZerosAndNoGradient) {
  using T = typename TypeParam::T;
  using IdT = typename TypeParam::IdT;
  using OffsetT = typename TypeParam::OffsetT;
  const std::vector<T> params = {1, 2, 3, 4};
  // Bag 0: weights summing to zero (mean's divisor); bag 1: all zero; bag 2: empty; bag 3: 2 x
  // row 1.
  const std::vector<IdT> ids = {0, 1, 0, 1};
  const std::vector<T> weights = {1, -1, 0, 2};
  const std::vector<OffsetT> splits = {0, 2, 3, 3, 4};
  const CsrIds<IdT, OffsetT> csr{ids.data(), 4, splits.data(), 4};
  const std::vector<T> grad = {1, 1, 1, 1, 1, 1, 1, 1};
  for (Combiner combiner : {Combiner::kMean, Combiner::kSqrtn}) {
    SCOPED_TRACE(static_cast<int>(combiner));
    std::vector<T> output(8, T(-1));
    ASSERT_TRUE(WeightedPooledLookupForwardCpu(params.data(), 2, 2, csr, weights.data(), combiner,
                                               BoundsCheck::kError, output.data())
                    .ok());
    // sqrtn divides bag 0's (1*row0 - row1) = (-2, -2) by sqrt(2); mean's divisor there is zero.
    const T bag0 = combiner == Combiner::kMean ? T(0) : T(-2) / std::sqrt(T(2));
    // Bag 3: 2 * row 1 divided by 2 (mean: sum of weights; sqrtn: sqrt(4)).
    EXPECT_EQ(output, (std::vector<T>{bag0, bag0, 0, 0, 0, 0, 3, 4}));
    std::vector<IdT> unique_ids(2);
    std::vector<T> unique_grad(4, T(-1));
    int64_t num_unique = 0;
    ASSERT_TRUE(WeightedPooledLookupBackwardCpu(grad.data(), 2, 2, csr, weights.data(), combiner,
                                                BoundsCheck::kError, unique_ids.data(),
                                                unique_grad.data(), &num_unique)
                    .ok());
    ASSERT_EQ(num_unique, 2);
    EXPECT_EQ(unique_ids, (std::vector<IdT>{0, 1}));
    const T g0 = combiner == Combiner::kMean ? T(0) : T(1) / std::sqrt(T(2));
    const T g1 = combiner == Combiner::kMean ? T(1) : T(-1) / std::sqrt(T(2)) + T(1);
    for (int k = 0; k < 2; ++k) {
      EXPECT_NEAR(unique_grad[k], g0, 1e-6);
      EXPECT_NEAR(unique_grad[2 + k], g1, 1e-6);
    }
  }
}

TYPED_TEST(LookupCpuTest, SkipModeMeanDividesByValidCount) {
  using T = typename TypeParam::T;
  using IdT = typename TypeParam::IdT;
  using OffsetT = typename TypeParam::OffsetT;
  const std::vector<T> params = {2, 4, 6, 8};
  const std::vector<IdT> ids = {0, 9, 1, -3};
  const std::vector<OffsetT> splits = {0, 4};
  const CsrIds<IdT, OffsetT> csr{ids.data(), 4, splits.data(), 1};
  std::vector<T> output(2);
  ASSERT_TRUE(PooledLookupForwardCpu(params.data(), 2, 2, csr, Combiner::kMean, BoundsCheck::kSkip,
                                     output.data())
                  .ok());
  EXPECT_EQ(output, (std::vector<T>{4, 6}));
}

TYPED_TEST(LookupCpuTest, SkipModeWithEveryIdInvalidGivesEmptyGradient) {
  // Found by the fuzzer: the backward pass divided by the number of unique ids.
  using T = typename TypeParam::T;
  using IdT = typename TypeParam::IdT;
  using OffsetT = typename TypeParam::OffsetT;
  const std::vector<IdT> ids = {-1, 7, 9};
  const std::vector<OffsetT> splits = {0, 2, 3};
  const CsrIds<IdT, OffsetT> csr{ids.data(), 3, splits.data(), 2};
  const std::vector<T> grad(4, T(1));
  std::vector<IdT> unique_ids(2);
  std::vector<T> unique_grad(4);
  int64_t num_unique = -1;
  ASSERT_TRUE(PooledLookupBackwardCpu(grad.data(), 2, 2, csr, Combiner::kMean, BoundsCheck::kSkip,
                                      unique_ids.data(), unique_grad.data(), &num_unique)
                  .ok());
  EXPECT_EQ(num_unique, 0);
}

class LookupCpuErrorTest : public ::testing::Test {
 protected:
  // Runs forward and backward on bad input; both must fail with `message` and leave every output
  // byte untouched.
  void ExpectRejected(const std::vector<int64_t>& ids, const std::vector<int64_t>& splits,
                      const std::string& message) {
    const std::vector<float> params(4 * 2, 1.0f);
    const CsrIds<int64_t, int64_t> csr{ids.data(), static_cast<int64_t>(ids.size()), splits.data(),
                                       static_cast<int64_t>(splits.size()) - 1};
    std::vector<float> output(2 * std::max<int64_t>(csr.batch, 0), 42.0f);
    const Status forward = PooledLookupForwardCpu(params.data(), 4, 2, csr, Combiner::kSum,
                                                  BoundsCheck::kError, output.data());
    EXPECT_EQ(forward.code(), Status::Code::kInvalidArgument);
    EXPECT_THAT(forward.message(), HasSubstr(message));
    for (float v : output) EXPECT_EQ(v, 42.0f);

    std::vector<int64_t> unique_ids(ids.size() + 1, 5);
    std::vector<float> unique_grad(2 * (ids.size() + 1), 42.0f);
    int64_t num_unique = 0;
    const Status backward =
        PooledLookupBackwardCpu(output.data(), 4, 2, csr, Combiner::kMean, BoundsCheck::kError,
                                unique_ids.data(), unique_grad.data(), &num_unique);
    EXPECT_EQ(backward.code(), Status::Code::kInvalidArgument);
    EXPECT_THAT(backward.message(), HasSubstr(message));
    for (int64_t v : unique_ids) EXPECT_EQ(v, 5);
    for (float v : unique_grad) EXPECT_EQ(v, 42.0f);
  }
};

TEST_F(LookupCpuErrorTest, RejectsIdPastVocabulary) {
  ExpectRejected({0, 4, 1}, {0, 2, 3},
                 "'ids' must be in [0, 4), the rows of 'params'; got ids[1] = 4.");
}

TEST_F(LookupCpuErrorTest, RejectsNegativeId) {
  ExpectRejected({0, 1, -1}, {0, 2, 3}, "got ids[2] = -1.");
}

TEST_F(LookupCpuErrorTest, RejectsRowSplitsNotStartingAtZero) {
  ExpectRejected({0, 1, 2}, {1, 2, 3}, "'row_splits' must start at 0; got row_splits[0] = 1.");
}

TEST_F(LookupCpuErrorTest, RejectsDecreasingRowSplits) {
  ExpectRejected({0, 1, 2}, {0, 2, 1, 3},
                 "'row_splits' must be non-decreasing; got row_splits[1] = 2 > row_splits[2] = 1.");
}

TEST_F(LookupCpuErrorTest, ReportsRowSplitsErrorsInTheDocumentedOrder) {
  // The CUDA suite checks the same two inputs for the same messages.
  ExpectRejected({0, 1, 2}, {0, 2, 1, 5}, "got row_splits[1] = 2 > row_splits[2] = 1.");
  ExpectRejected({0, 1, 2}, {1, 0, 3}, "'row_splits' must start at 0; got row_splits[0] = 1.");
}

TEST(LookupCpuTest, Int32IdsWithMoreRowsThanInt32SkipsOnlyInvalidIds) {
  for (const int64_t num_rows : {int64_t{1} << 31, (int64_t{1} << 32) + 5}) {
    const std::vector<int32_t> ids = {-1, 2147483647, 5, -3, 5, 0};
    const std::vector<int64_t> splits = {0, 3, 6};
    const CsrIds<int32_t, int64_t> csr{ids.data(), 6, splits.data(), 2};
    const std::vector<float> grad(2, 1.0f);
    std::vector<int32_t> unique_ids(6);
    std::vector<float> unique_grad(1);
    int64_t num_unique = -1;
    ASSERT_TRUE(PooledLookupBackwardCpu(grad.data(), num_rows, 0, csr, Combiner::kSum,
                                        BoundsCheck::kSkip, unique_ids.data(), unique_grad.data(),
                                        &num_unique)
                    .ok());
    ASSERT_EQ(num_unique, 3);
    unique_ids.resize(3);  // first-occurrence order on the CPU
    EXPECT_EQ(unique_ids, (std::vector<int32_t>{2147483647, 5, 0})) << num_rows;
  }
}

TEST_F(LookupCpuErrorTest, RejectsRowSplitsNotEndingAtNnz) {
  ExpectRejected({0, 1, 2}, {0, 1, 5}, "'row_splits' must end at 3, the number of 'ids'");
  ExpectRejected({0, 1, 2}, {0, 1, 2}, "got row_splits[2] = 2.");
}

TEST(LookupCpuLimitsTest, RejectsNnzBeyondInt32Splits) {
  // Only the count is inspected, so no buffer of 2^31 ids is needed.
  const std::vector<int32_t> splits = {0, 0};
  const CsrIds<int32_t, int32_t> csr{nullptr, int64_t{1} << 31, splits.data(), 1};
  const Status status = ValidateCsrIds(csr, 10, BoundsCheck::kError);
  EXPECT_EQ(status.code(), Status::Code::kInvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("32-bit row_splits"));
}

TEST(CooToRowSplitsCpuTest, CountsEntriesPerRow) {
  // Rows 0, 2, 2, 4 of a 6 x 3 matrix; rows 1, 3 and 5 are empty.
  const std::vector<int64_t> indices = {0, 1, 2, 0, 2, 2, 4, 1};
  std::vector<int64_t> splits(7, -1);
  ASSERT_TRUE(CooToRowSplitsCpu(indices.data(), 4, 6, 3, splits.data()).ok());
  EXPECT_EQ(splits, (std::vector<int64_t>{0, 1, 1, 3, 3, 4, 4}));
}

TEST(CooToRowSplitsCpuTest, EmptyInputGivesZeroSplits) {
  std::vector<int32_t> splits(4, -1);
  ASSERT_TRUE(CooToRowSplitsCpu<int32_t>(nullptr, 0, 3, 5, splits.data()).ok());
  EXPECT_EQ(splits, (std::vector<int32_t>{0, 0, 0, 0}));
}

TEST(CooToRowSplitsCpuTest, RejectsOutOfOrderRows) {
  const std::vector<int64_t> indices = {1, 0, 0, 2};
  std::vector<int64_t> splits(3, 0);
  const Status status = CooToRowSplitsCpu(indices.data(), 2, 2, 3, splits.data());
  EXPECT_EQ(status.code(), Status::Code::kInvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("got indices[1] = [0, 2] after [1, 0]"));
  EXPECT_THAT(status.message(), HasSubstr("tf.sparse.reorder"));
}

TEST(CooToRowSplitsCpuTest, RejectsDuplicateIndex) {
  const std::vector<int64_t> indices = {0, 1, 0, 1};
  std::vector<int64_t> splits(2, 0);
  EXPECT_FALSE(CooToRowSplitsCpu(indices.data(), 2, 1, 3, splits.data()).ok());
}

TEST(CooToRowSplitsCpuTest, RejectsIndexOutsideDenseShape) {
  std::vector<int64_t> splits(3, 0);
  for (const std::vector<int64_t>& indices :
       {std::vector<int64_t>{0, 0, 2, 0}, std::vector<int64_t>{0, 0, 1, 3},
        std::vector<int64_t>{-1, 0, 1, 0}, std::vector<int64_t>{0, -2, 1, 0}}) {
    const Status status = CooToRowSplitsCpu(indices.data(), 2, 2, 3, splits.data());
    EXPECT_EQ(status.code(), Status::Code::kInvalidArgument);
    EXPECT_THAT(status.message(), HasSubstr("'indices' must lie in [0, 2) x [0, 3)"));
  }
}

// A ParallelFor that runs every unit of work on its own, so a test sees each piece.
ParallelFor PiecewiseParallelFor() {
  return [](int64_t total, int64_t, const std::function<void(int64_t, int64_t)>& work) {
    for (int64_t p = 0; p < total; ++p) work(p, p + 1);
  };
}

TEST(RunParallelBalancedTest, PiecesCoverEveryItemOnceWithEvenLoads) {
  std::mt19937 rng(3);
  for (const int64_t n : {1, 5, 63, 64, 65, 1000, 8192}) {
    for (const bool skewed : {false, true}) {
      SCOPED_TRACE(::testing::Message() << "n " << n << (skewed ? " skewed" : " uniform"));
      // Skewed: power-law-like lengths, a few bags hundreds of ids long, many empty.
      std::vector<int64_t> prefix(n + 1, 0);
      int64_t max_weight = 0;
      for (int64_t i = 0; i < n; ++i) {
        const int64_t length = skewed ? (rng() % 50 == 0 ? 100 + rng() % 400 : rng() % 3) : 10;
        prefix[i + 1] = prefix[i] + length;
        max_weight = std::max(max_weight, length + 1);
      }
      std::vector<std::pair<int64_t, int64_t>> ranges;
      std::mutex mutex;
      RunParallelBalanced(PiecewiseParallelFor(), n, prefix.data(), 1,
                          [&](int64_t begin, int64_t end) {
                            std::lock_guard<std::mutex> lock(mutex);
                            ranges.emplace_back(begin, end);
                          });
      std::sort(ranges.begin(), ranges.end());
      ASSERT_FALSE(ranges.empty());
      EXPECT_EQ(ranges.front().first, 0);
      EXPECT_EQ(ranges.back().second, n);
      const int64_t total = prefix[n] + n;
      const int64_t pieces = std::min<int64_t>(n, 64);
      for (size_t r = 0; r < ranges.size(); ++r) {
        EXPECT_LT(ranges[r].first, ranges[r].second);
        if (r > 0) {
          EXPECT_EQ(ranges[r].first, ranges[r - 1].second);
        }
        const int64_t load = prefix[ranges[r].second] - prefix[ranges[r].first] +
                             (ranges[r].second - ranges[r].first);
        // A piece overshoots its share by less than one item.
        EXPECT_LT(load, total / pieces + 1 + max_weight);
      }
    }
  }
}

TEST(RunParallelBalancedTest, RunsInlineWithoutParallelFor) {
  const std::vector<int32_t> prefix = {0, 4, 4, 9};
  std::vector<std::pair<int64_t, int64_t>> ranges;
  RunParallelBalanced(ParallelFor(), 3, prefix.data(), 1,
                      [&](int64_t begin, int64_t end) { ranges.emplace_back(begin, end); });
  EXPECT_THAT(ranges, ::testing::ElementsAre(std::make_pair(int64_t{0}, int64_t{3})));
}

#if !defined(__SANITIZE_ADDRESS__)
// The address space this process has mapped now, in bytes.
size_t MappedBytes() {
  FILE* statm = fopen("/proc/self/statm", "r");
  size_t pages = 0;
  if (statm != nullptr) {
    if (fscanf(statm, "%zu", &pages) != 1) pages = 0;
    fclose(statm);
  }
  return pages * static_cast<size_t>(sysconf(_SC_PAGESIZE));
}

// The backward, sum, width 1, on `ids` in bags split at `splits`, with at most `extra_bytes` of
// address space beyond what is mapped when it starts (RLIMIT_AS, restored after the call).
Status BackwardWithin(size_t extra_bytes, const std::vector<int64_t>& ids,
                      const std::vector<int64_t>& splits, const std::vector<float>& grad,
                      std::vector<int64_t>* unique_ids, std::vector<float>* unique_grad,
                      int64_t* num_unique) {
  const int64_t nnz = static_cast<int64_t>(ids.size());
  const CsrIds<int64_t, int64_t> csr{ids.data(), nnz, splits.data(),
                                     static_cast<int64_t>(splits.size()) - 1};
  unique_ids->assign(nnz, 0);
  unique_grad->assign(nnz, 0.0f);
  rlimit old_limit;
  if (getrlimit(RLIMIT_AS, &old_limit) != 0) return Status::Internal("getrlimit failed");
  rlimit tight = old_limit;
  tight.rlim_cur = MappedBytes() + extra_bytes;
  if (setrlimit(RLIMIT_AS, &tight) != 0) return Status::Internal("setrlimit failed");
  const Status status =
      PooledLookupBackwardCpu(grad.data(), nnz, 1, csr, Combiner::kSum, BoundsCheck::kError,
                              unique_ids->data(), unique_grad->data(), num_unique);
  if (setrlimit(RLIMIT_AS, &old_limit) != 0) return Status::Internal("setrlimit failed");
  return status;
}
#endif

TEST(LookupCpuMemoryTest, OutOfMemoryForScratchIsResourceExhaustedNotTerminate) {
#if defined(__SANITIZE_ADDRESS__)
  GTEST_SKIP() << "AddressSanitizer maps more address space than any RLIMIT_AS left to us.";
#else
  // 8M distinct ids: the backward's scratch (map, per-id indices) needs about 300 MB.
  const int64_t nnz = int64_t{8} << 20;
  std::vector<int64_t> ids(nnz);
  std::iota(ids.begin(), ids.end(), 0);
  std::vector<int64_t> unique_ids;
  std::vector<float> unique_grad;
  int64_t num_unique = -1;
  const Status status = BackwardWithin(size_t{64} << 20, ids, {0, nnz}, {1.0f}, &unique_ids,
                                       &unique_grad, &num_unique);
  EXPECT_EQ(status.code(), Status::Code::kResourceExhausted);
  EXPECT_THAT(status.message(), HasSubstr("out of memory"));
  EXPECT_EQ(num_unique, 0);
#endif
}

TEST(LookupCpuMemoryTest, BackwardScratchIsBoundedForTablesNoLargerThanTheBatch) {
#if defined(__SANITIZE_ADDRESS__)
  GTEST_SKIP() << "AddressSanitizer maps more address space than any RLIMIT_AS left to us.";
#else
  // 4M distinct ids of a 4M-row table: the scratch must peak under 36 bytes per id. It peaked
  // at 40 (a 32-byte-per-id hash map, zeroed serially) before the per-row index for such tables.
  const int64_t nnz = int64_t{4} << 20;
  std::vector<int64_t> ids(nnz);
  for (int64_t j = 0; j < nnz; ++j) ids[j] = (j * 2654435761) % nnz;  // a permutation
  std::vector<int64_t> unique_ids;
  std::vector<float> unique_grad;
  int64_t num_unique = -1;
  const Status status = BackwardWithin(static_cast<size_t>(36 * nnz), ids, {0, nnz / 2, nnz},
                                       {1.0f, 2.0f}, &unique_ids, &unique_grad, &num_unique);
  ASSERT_TRUE(status.ok()) << status.message();
  ASSERT_EQ(num_unique, nnz);
  // First-occurrence order, each id's gradient its bag's.
  for (int64_t u = 0; u < nnz; u += 4099) {
    ASSERT_EQ(unique_ids[u], ids[u]);
    ASSERT_EQ(unique_grad[u], u < nnz / 2 ? 1.0f : 2.0f);
  }
#endif
}

}  // namespace
}  // namespace distributed_embeddings
