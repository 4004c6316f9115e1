// Tests of the CPU sparse optimizer updates against a double-precision reference written from the
// rules' definitions, and, for distinct indices, against the rules' float operations one by one
// (Keras's update of a row), which the kernel must match bit for bit.
#include "embedding/kernels/sparse_update.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "embedding/kernels/lookup_test_util.h"
#include "embedding/kernels/sparse_update_test_util.h"
#include "gtest/gtest.h"

namespace distributed_embeddings {
namespace {

using ::distributed_embeddings::testing::Hyper;
using ::distributed_embeddings::testing::kRules;
using ::distributed_embeddings::testing::ReferenceRuleAt;
using ::distributed_embeddings::testing::RuleName;
using ::distributed_embeddings::testing::SparseTableOf;
using ::distributed_embeddings::testing::ThreadedParallelFor;
using ::distributed_embeddings::testing::ToKernel;

// A table, its state and a gradient, all random.
template <typename T, typename IdT>
struct UpdateCase {
  int64_t num_rows = 0, width = 0;
  std::vector<T> weights, slot0, slot1;
  std::vector<IdT> indices;
  std::vector<T> grad;

  SparseTable<T> Table(SparseRule rule) {
    return SparseTableOf(rule, num_rows, width, weights, slot0, slot1);
  }
};

template <typename T, typename IdT>
UpdateCase<T, IdT> MakeUpdateCase(SparseRule rule, int64_t num_rows, int64_t width,
                                  int64_t num_indices, bool distinct, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<double> value(-1.0, 1.0), positive(0.05, 1.0);
  UpdateCase<T, IdT> c;
  c.num_rows = num_rows;
  c.width = width;
  for (int64_t i = 0; i < num_rows * width; ++i) c.weights.push_back(static_cast<T>(value(rng)));
  const int64_t slot_size = SparseRuleSlotsPerRow(rule) ? num_rows : num_rows * width;
  // Adagrad's accumulators and Adam's second moment are positive; Adam's first moment is signed.
  for (int64_t i = 0; i < slot_size; ++i) {
    c.slot0.push_back(static_cast<T>(rule == SparseRule::kLazyAdam ? value(rng) : positive(rng)));
    c.slot1.push_back(static_cast<T>(positive(rng) * 1e-2));
  }
  std::vector<IdT> all(num_rows);
  for (int64_t r = 0; r < num_rows; ++r) all[r] = static_cast<IdT>(r);
  std::shuffle(all.begin(), all.end(), rng);
  std::uniform_int_distribution<int64_t> any_row(0, num_rows - 1);
  for (int64_t j = 0; j < num_indices; ++j) {
    c.indices.push_back(
        distinct ? all[j] : static_cast<IdT>(any_row(rng) % std::max<int64_t>(7, num_rows / 8)));
  }
  for (int64_t i = 0; i < num_indices * width; ++i) c.grad.push_back(static_cast<T>(value(rng)));
  return c;
}

// The rules of sparse_update.h in double: repeated indices' rows summed first.
template <typename T, typename IdT>
void ReferenceUpdate(SparseRule rule, const Hyper& h, const UpdateCase<T, IdT>& c,
                     std::vector<double>* weights, std::vector<double>* slot0,
                     std::vector<double>* slot1) {
  weights->assign(c.weights.begin(), c.weights.end());
  slot0->assign(c.slot0.begin(), c.slot0.end());
  slot1->assign(c.slot1.begin(), c.slot1.end());
  const int64_t width = c.width;
  std::vector<std::vector<double>> summed(c.num_rows);
  for (size_t j = 0; j < c.indices.size(); ++j) {
    std::vector<double>& g = summed[c.indices[j]];
    g.resize(width, 0.0);
    for (int64_t k = 0; k < width; ++k) g[k] += c.grad[j * width + k];
  }
  for (int64_t r = 0; r < c.num_rows; ++r) {
    const std::vector<double>& g = summed[r];
    if (g.empty()) continue;
    ReferenceRuleAt(rule, h, width, g.data(), r, weights, slot0, slot1);
  }
}

template <typename T>
void ExpectAllNear(const std::vector<double>& expected, const std::vector<T>& actual,
                   const std::string& what) {
  ASSERT_EQ(expected.size(), actual.size()) << what;
  const double tolerance = std::is_same<T, float>::value ? 2e-5 : 1e-12;
  for (size_t i = 0; i < expected.size(); ++i) {
    ASSERT_NEAR(expected[i], actual[i], tolerance * (1 + std::abs(expected[i])))
        << what << "[" << i << "]";
  }
}

template <typename T, typename IdT>
void CheckAgainstReference(SparseRule rule, int64_t num_rows, int64_t width, int64_t num_indices,
                           bool distinct, const ParallelFor& parallel_for) {
  SCOPED_TRACE(RuleName(rule) + " width " + std::to_string(width) +
               (distinct ? " distinct" : " repeated"));
  const Hyper h;
  UpdateCase<T, IdT> c = MakeUpdateCase<T, IdT>(rule, num_rows, width, num_indices, distinct, 7);
  std::vector<double> weights, slot0, slot1;
  ReferenceUpdate(rule, h, c, &weights, &slot0, &slot1);
  const Status status =
      SparseUpdateCpu(rule, ToKernel<T>(rule, h), c.Table(rule), c.indices.data(),
                      static_cast<int64_t>(c.indices.size()), c.grad.data(), parallel_for);
  ASSERT_TRUE(status.ok()) << status.message();
  ExpectAllNear(weights, c.weights, "weights");
  if (SparseRuleSlots(rule) > 0) ExpectAllNear(slot0, c.slot0, "slot0");
  if (SparseRuleSlots(rule) > 1) ExpectAllNear(slot1, c.slot1, "slot1");
}

TEST(SparseUpdateTest, MatchesDoubleReference) {
  for (SparseRule rule : kRules) {
    for (int64_t width : {1, 3, 16, 64, 67}) {
      for (bool distinct : {true, false}) {
        CheckAgainstReference<float, int64_t>(rule, 200, width, 50, distinct, ParallelFor());
        CheckAgainstReference<double, int32_t>(rule, 200, width, 50, distinct, ParallelFor());
      }
    }
  }
}

TEST(SparseUpdateTest, MatchesDoubleReferenceOnThreads) {
  for (SparseRule rule : kRules) {
    for (bool distinct : {true, false}) {
      CheckAgainstReference<float, int32_t>(rule, 5000, 32, 3000, distinct, ThreadedParallelFor(4));
    }
  }
}

TEST(SparseUpdateTest, HashMapPathForLargeTables) {
  // A table much larger than the index count takes the hash map, not the per-row index.
  for (SparseRule rule : kRules) {
    CheckAgainstReference<float, int64_t>(rule, 100000, 4, 40, true, ThreadedParallelFor(3));
    CheckAgainstReference<float, int64_t>(rule, 100000, 4, 40, false, ParallelFor());
  }
}

// Keras's update of one row in float, operation by operation (the kernel must agree bit for bit).
void KerasRowUpdate(SparseRule rule, const SparseHyper<float>& h, int64_t width, const float* g,
                    float* w, float* s0, float* s1) {
  for (int64_t k = 0; k < width; ++k) {
    if (rule == SparseRule::kSgd) {
      const float step = g[k] * h.learning_rate;
      w[k] = w[k] - step;
    } else if (rule == SparseRule::kAdagrad) {
      const float square = g[k] * g[k];
      s0[k] = s0[k] + square;
      const float numerator = h.learning_rate * g[k];
      const float denominator = std::sqrt(s0[k] + h.epsilon);
      w[k] = w[k] - numerator / denominator;
    } else if (rule == SparseRule::kLazyAdam) {
      const float dm = (g[k] - s0[k]) * h.one_minus_beta1;
      s0[k] = s0[k] + dm;
      const float square = g[k] * g[k];
      const float dv = (square - s1[k]) * h.one_minus_beta2;
      s1[k] = s1[k] + dv;
      const float numerator = s0[k] * h.learning_rate;
      const float denominator = std::sqrt(s1[k]) + h.epsilon;
      w[k] = w[k] - numerator / denominator;
    }
  }
}

TEST(SparseUpdateTest, DistinctIndicesMatchKerasBitForBit) {
  for (SparseRule rule : {SparseRule::kSgd, SparseRule::kAdagrad, SparseRule::kLazyAdam}) {
    for (bool portable : {false, true}) {
      SCOPED_TRACE(RuleName(rule) + (portable ? " portable" : " native"));
      ForcePortableCpuLoopsForTesting(portable);
      UpdateCase<float, int64_t> c = MakeUpdateCase<float, int64_t>(rule, 300, 64, 120, true, 11);
      UpdateCase<float, int64_t> expected = c;
      const SparseHyper<float> h = ToKernel<float>(rule, Hyper());
      for (size_t j = 0; j < c.indices.size(); ++j) {
        const int64_t r = c.indices[j];
        KerasRowUpdate(rule, h, c.width, c.grad.data() + j * c.width,
                       expected.weights.data() + r * c.width, expected.slot0.data() + r * c.width,
                       expected.slot1.data() + r * c.width);
      }
      ASSERT_TRUE(SparseUpdateCpu(rule, h, c.Table(rule), c.indices.data(),
                                  static_cast<int64_t>(c.indices.size()), c.grad.data(),
                                  ThreadedParallelFor(2))
                      .ok());
      EXPECT_EQ(expected.weights, c.weights);
      EXPECT_EQ(expected.slot0, c.slot0);
      EXPECT_EQ(expected.slot1, c.slot1);
    }
  }
  ForcePortableCpuLoopsForTesting(false);
}

TEST(SparseUpdateTest, RowwiseAdagradOfWidthOneIsAdagrad) {
  UpdateCase<float, int32_t> rowwise =
      MakeUpdateCase<float, int32_t>(SparseRule::kRowwiseAdagrad, 100, 1, 60, false, 3);
  UpdateCase<float, int32_t> adagrad = rowwise;
  const SparseHyper<float> h = ToKernel<float>(SparseRule::kAdagrad, Hyper());
  ASSERT_TRUE(SparseUpdateCpu(SparseRule::kRowwiseAdagrad, h,
                              rowwise.Table(SparseRule::kRowwiseAdagrad), rowwise.indices.data(),
                              60, rowwise.grad.data())
                  .ok());
  ASSERT_TRUE(SparseUpdateCpu(SparseRule::kAdagrad, h, adagrad.Table(SparseRule::kAdagrad),
                              adagrad.indices.data(), 60, adagrad.grad.data())
                  .ok());
  EXPECT_EQ(rowwise.weights, adagrad.weights);
  EXPECT_EQ(rowwise.slot0, adagrad.slot0);
}

TEST(SparseUpdateTest, ThreadsGiveTheSameBits) {
  for (SparseRule rule : kRules) {
    UpdateCase<float, int64_t> serial =
        MakeUpdateCase<float, int64_t>(rule, 4000, 24, 5000, false, 5);
    UpdateCase<float, int64_t> threaded = serial;
    const SparseHyper<float> h = ToKernel<float>(rule, Hyper());
    ASSERT_TRUE(SparseUpdateCpu(rule, h, serial.Table(rule), serial.indices.data(), 5000,
                                serial.grad.data())
                    .ok());
    ASSERT_TRUE(SparseUpdateCpu(rule, h, threaded.Table(rule), threaded.indices.data(), 5000,
                                threaded.grad.data(), ThreadedParallelFor(4))
                    .ok());
    EXPECT_EQ(serial.weights, threaded.weights) << RuleName(rule);
    EXPECT_EQ(serial.slot0, threaded.slot0) << RuleName(rule);
    EXPECT_EQ(serial.slot1, threaded.slot1) << RuleName(rule);
  }
}

TEST(SparseUpdateTest, BadIndexIsAnErrorAndWritesNothing) {
  for (SparseRule rule : kRules) {
    for (int64_t bad : {int64_t{-1}, int64_t{50}, int64_t{1} << 40}) {
      UpdateCase<float, int64_t> c = MakeUpdateCase<float, int64_t>(rule, 50, 8, 10, true, 9);
      c.indices[6] = bad;
      const UpdateCase<float, int64_t> before = c;
      const Status status = SparseUpdateCpu(rule, ToKernel<float>(rule, Hyper()), c.Table(rule),
                                            c.indices.data(), 10, c.grad.data());
      ASSERT_EQ(status.code(), Status::Code::kInvalidArgument);
      EXPECT_NE(status.message().find("indices[6] = " + std::to_string(bad)), std::string::npos)
          << status.message();
      EXPECT_NE(status.message().find("[0, 50)"), std::string::npos) << status.message();
      EXPECT_EQ(before.weights, c.weights);
      EXPECT_EQ(before.slot0, c.slot0);
      EXPECT_EQ(before.slot1, c.slot1);
    }
  }
}

TEST(SparseUpdateTest, EmptyGradientAndEmptyTable) {
  UpdateCase<float, int32_t> c =
      MakeUpdateCase<float, int32_t>(SparseRule::kAdagrad, 10, 4, 0, true, 1);
  const UpdateCase<float, int32_t> before = c;
  EXPECT_TRUE(SparseUpdateCpu(SparseRule::kAdagrad, ToKernel<float>(SparseRule::kAdagrad, Hyper()),
                              c.Table(SparseRule::kAdagrad), c.indices.data(), 0, c.grad.data())
                  .ok());
  EXPECT_EQ(before.weights, c.weights);
  // No row exists, so any index is out of range.
  SparseTable<float> empty;
  const int32_t zero = 0;
  const float g = 1;
  EXPECT_EQ(SparseUpdateCpu(SparseRule::kSgd, SparseHyper<float>(), empty, &zero, 1, &g).code(),
            Status::Code::kInvalidArgument);
}

TEST(SparseUpdateTest, MissingStateIsAnError) {
  UpdateCase<float, int32_t> c =
      MakeUpdateCase<float, int32_t>(SparseRule::kLazyAdam, 10, 4, 3, true, 1);
  SparseTable<float> table = c.Table(SparseRule::kLazyAdam);
  table.slots[1] = nullptr;
  EXPECT_EQ(SparseUpdateCpu(SparseRule::kLazyAdam, SparseHyper<float>(), table, c.indices.data(), 3,
                            c.grad.data())
                .code(),
            Status::Code::kInvalidArgument);
}

}  // namespace
}  // namespace distributed_embeddings
