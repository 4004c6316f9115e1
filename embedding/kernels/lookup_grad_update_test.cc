// Tests of LookupGradSparseUpdateCpu, the lookup backward fused with the sparse update: bit for
// bit what the backward followed by SparseUpdateCpu gives, close to the rules applied in double to
// the reference gradient, and the backward's checks before anything is written.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "embedding/kernels/embedding_lookup.h"
#include "embedding/kernels/lookup_test_util.h"
#include "embedding/kernels/sparse_update.h"
#include "embedding/kernels/sparse_update_test_util.h"
#include "gtest/gtest.h"

namespace distributed_embeddings {
namespace {

using ::distributed_embeddings::testing::CaseSpec;
using ::distributed_embeddings::testing::ForEachCpuLoopBuild;
using ::distributed_embeddings::testing::Hyper;
using ::distributed_embeddings::testing::kRules;
using ::distributed_embeddings::testing::LookupCase;
using ::distributed_embeddings::testing::MakeCase;
using ::distributed_embeddings::testing::MaxOccurrences;
using ::distributed_embeddings::testing::ReferenceBackward;
using ::distributed_embeddings::testing::ReferenceRuleAt;
using ::distributed_embeddings::testing::RuleName;
using ::distributed_embeddings::testing::SparseTableOf;
using ::distributed_embeddings::testing::StandardSpecs;
using ::distributed_embeddings::testing::ThreadedParallelFor;
using ::distributed_embeddings::testing::ToKernel;
using ::distributed_embeddings::testing::Valid;

const Combiner kCombiners[] = {Combiner::kSum, Combiner::kMean, Combiner::kSqrtn};

// A table (the lookup case's params) and the rule's state, random: Adagrad's accumulators and
// Adam's second moment positive, Adam's first moment signed.
template <typename T>
struct TableState {
  int64_t num_rows = 0, width = 0;
  std::vector<T> weights, slot0, slot1;

  SparseTable<T> Table(SparseRule rule) {
    return SparseTableOf(rule, num_rows, width, weights, slot0, slot1);
  }
};

template <typename T, typename IdT, typename OffsetT>
TableState<T> MakeTableState(SparseRule rule, const LookupCase<T, IdT, OffsetT>& c, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<double> value(-1.0, 1.0), positive(0.05, 1.0);
  TableState<T> s;
  s.num_rows = c.num_rows;
  s.width = c.width;
  s.weights = c.params;
  const int64_t slot_size = SparseRuleSlotsPerRow(rule) ? c.num_rows : c.num_rows * c.width;
  for (int64_t i = 0; i < slot_size; ++i) {
    s.slot0.push_back(static_cast<T>(rule == SparseRule::kLazyAdam ? value(rng) : positive(rng)));
    s.slot1.push_back(static_cast<T>(positive(rng) * 1e-2));
  }
  return s;
}

template <typename T, typename IdT, typename OffsetT>
Status Fused(SparseRule rule, const SparseHyper<T>& h, TableState<T>* s,
             const LookupCase<T, IdT, OffsetT>& c, bool weighted, Combiner combiner,
             BoundsCheck bounds_check, const ParallelFor& parallel_for) {
  return LookupGradSparseUpdateCpu(rule, h, s->Table(rule), c.grad_output.data(), c.Csr(),
                                   weighted ? c.weights.data() : nullptr, combiner, bounds_check,
                                   parallel_for);
}

// The two passes the fused kernel replaces: the lookup's backward, then the update of its rows.
template <typename T, typename IdT, typename OffsetT>
void Unfused(SparseRule rule, const SparseHyper<T>& h, TableState<T>* s,
             const LookupCase<T, IdT, OffsetT>& c, bool weighted, Combiner combiner,
             BoundsCheck bounds_check) {
  std::vector<IdT> unique_ids(std::max<int64_t>(1, MaxUniqueIds(c.Csr().nnz, c.num_rows)));
  std::vector<T> unique_grad(unique_ids.size() * c.width);
  int64_t num_unique = 0;
  const Status backward =
      weighted ? WeightedPooledLookupBackwardCpu(c.grad_output.data(), c.num_rows, c.width, c.Csr(),
                                                 c.weights.data(), combiner, bounds_check,
                                                 unique_ids.data(), unique_grad.data(), &num_unique)
               : PooledLookupBackwardCpu(c.grad_output.data(), c.num_rows, c.width, c.Csr(),
                                         combiner, bounds_check, unique_ids.data(),
                                         unique_grad.data(), &num_unique);
  ASSERT_TRUE(backward.ok()) << backward.message();
  const Status update =
      SparseUpdateCpu(rule, h, s->Table(rule), unique_ids.data(), num_unique, unique_grad.data());
  ASSERT_TRUE(update.ok()) << update.message();
}

// The rule applied in double to every row the reference gradient touches (a valid id's row).
template <typename T, typename IdT, typename OffsetT>
void Reference(SparseRule rule, const Hyper& h, const TableState<T>& s,
               const LookupCase<T, IdT, OffsetT>& c, bool weighted, Combiner combiner,
               std::vector<double>* weights, std::vector<double>* slot0,
               std::vector<double>* slot1) {
  weights->assign(s.weights.begin(), s.weights.end());
  slot0->assign(s.slot0.begin(), s.slot0.end());
  slot1->assign(s.slot1.begin(), s.slot1.end());
  const std::vector<double> grad = ReferenceBackward(c, combiner, weighted);
  std::vector<bool> touched(c.num_rows, false);
  for (IdT id : c.ids) {
    if (Valid(static_cast<int64_t>(id), c.num_rows)) touched[static_cast<int64_t>(id)] = true;
  }
  for (int64_t r = 0; r < c.num_rows; ++r) {
    if (touched[r]) {
      ReferenceRuleAt(rule, h, c.width, grad.data() + r * c.width, r, weights, slot0, slot1);
    }
  }
}

template <typename T>
void ExpectClose(const std::vector<double>& expected, const std::vector<T>& actual,
                 int64_t max_occurrences, const std::string& what) {
  ASSERT_EQ(expected.size(), actual.size()) << what;
  // A sum of k terms in T is off by up to ~k ulps, and the rules square it.
  const double tolerance =
      (sizeof(T) == 4 ? 1e-4 : 1e-10) * (1.0 + static_cast<double>(max_occurrences) / 16.0);
  for (size_t i = 0; i < expected.size(); ++i) {
    ASSERT_NEAR(expected[i], static_cast<double>(actual[i]),
                tolerance * (1 + std::abs(expected[i])))
        << what << "[" << i << "]";
  }
}

template <typename T, typename IdT, typename OffsetT>
void CheckCase(SparseRule rule, const CaseSpec& spec, bool weighted, Combiner combiner,
               BoundsCheck bounds_check, const ParallelFor& parallel_for) {
  SCOPED_TRACE(RuleName(rule) + " rows " + std::to_string(spec.num_rows) + " width " +
               std::to_string(spec.width) + " seed " + std::to_string(spec.seed) +
               (weighted ? " weighted" : "") + " combiner " +
               std::to_string(static_cast<int>(combiner)));
  const LookupCase<T, IdT, OffsetT> c = MakeCase<T, IdT, OffsetT>(spec);
  const Hyper hyper;
  const SparseHyper<T> h = ToKernel<T>(rule, hyper);
  TableState<T> fused = MakeTableState(rule, c, spec.seed + 1);
  TableState<T> unfused = fused;
  const TableState<T> before = fused;
  const Status status = Fused(rule, h, &fused, c, weighted, combiner, bounds_check, parallel_for);
  ASSERT_TRUE(status.ok()) << status.message();
  Unfused(rule, h, &unfused, c, weighted, combiner, bounds_check);
  EXPECT_EQ(unfused.weights, fused.weights);
  EXPECT_EQ(unfused.slot0, fused.slot0);
  EXPECT_EQ(unfused.slot1, fused.slot1);
  std::vector<double> weights, slot0, slot1;
  Reference(rule, hyper, before, c, weighted, combiner, &weights, &slot0, &slot1);
  const int64_t most = MaxOccurrences(c);
  ExpectClose(weights, fused.weights, most, "weights");
  if (SparseRuleSlots(rule) > 0) ExpectClose(slot0, fused.slot0, most, "slot0");
  if (SparseRuleSlots(rule) > 1) ExpectClose(slot1, fused.slot1, most, "slot1");
}

TEST(LookupGradSparseUpdateTest, EqualsBackwardThenUpdate) {
  ForEachCpuLoopBuild([] {
    for (SparseRule rule : kRules) {
      for (const CaseSpec& spec : StandardSpecs(0.0)) {
        for (bool weighted : {false, true}) {
          for (Combiner combiner : kCombiners) {
            CheckCase<float, int64_t, int64_t>(rule, spec, weighted, combiner, BoundsCheck::kError,
                                               ParallelFor());
          }
        }
      }
    }
  });
}

TEST(LookupGradSparseUpdateTest, OtherTypesAndThreads) {
  for (SparseRule rule : kRules) {
    for (const CaseSpec& spec : StandardSpecs(0.0)) {
      CheckCase<double, int32_t, int32_t>(rule, spec, true, Combiner::kMean, BoundsCheck::kError,
                                          ThreadedParallelFor(3));
      CheckCase<float, int32_t, int64_t>(rule, spec, false, Combiner::kSqrtn, BoundsCheck::kError,
                                         ThreadedParallelFor(4));
      CheckCase<float, int64_t, int32_t>(rule, spec, false, Combiner::kSum, BoundsCheck::kError,
                                         ThreadedParallelFor(2));
    }
  }
}

TEST(LookupGradSparseUpdateTest, SkippedIdsUpdateNothing) {
  for (SparseRule rule : kRules) {
    for (const CaseSpec& spec : StandardSpecs(0.2)) {
      for (bool weighted : {false, true}) {
        CheckCase<float, int64_t, int64_t>(rule, spec, weighted, Combiner::kMean,
                                           BoundsCheck::kSkip, ThreadedParallelFor(3));
      }
    }
  }
}

TEST(LookupGradSparseUpdateTest, RowsWiderThanTheChunkBuffer) {
  // Wider than the stack buffer of summed rows: every row's sum goes to one buffer instead.
  for (SparseRule rule : kRules) {
    for (int64_t width : {2048, 2049, 4100}) {
      const CaseSpec spec{40, width, 12, 6, 0.1, 0.0, 21};
      CheckCase<float, int64_t, int64_t>(rule, spec, true, Combiner::kSum, BoundsCheck::kError,
                                         ThreadedParallelFor(2));
    }
  }
}

TEST(LookupGradSparseUpdateTest, BadInputIsAnErrorAndWritesNothing) {
  const CaseSpec spec{50, 8, 20, 5, 0.0, 0.0, 31};
  for (SparseRule rule : kRules) {
    SCOPED_TRACE(RuleName(rule));
    LookupCase<float, int64_t, int64_t> c = MakeCase<float, int64_t, int64_t>(spec);
    ASSERT_GT(c.ids.size(), 7u);
    const SparseHyper<float> h = ToKernel<float>(rule, Hyper());
    TableState<float> s = MakeTableState(rule, c, 5);
    const TableState<float> before = s;

    LookupCase<float, int64_t, int64_t> bad_id = c;
    bad_id.ids[7] = 50;
    Status status = Fused(rule, h, &s, bad_id, false, Combiner::kSum, BoundsCheck::kError,
                          ThreadedParallelFor(2));
    ASSERT_EQ(status.code(), Status::Code::kInvalidArgument);
    EXPECT_NE(status.message().find("50"), std::string::npos) << status.message();

    LookupCase<float, int64_t, int64_t> bad_splits = c;
    bad_splits.row_splits[3] = bad_splits.row_splits[4] + 1;
    status =
        Fused(rule, h, &s, bad_splits, true, Combiner::kMean, BoundsCheck::kSkip, ParallelFor());
    ASSERT_EQ(status.code(), Status::Code::kInvalidArgument);

    SparseTable<float> missing = s.Table(rule);
    if (SparseRuleSlots(rule) > 0) {
      missing.slots[SparseRuleSlots(rule) - 1] = nullptr;
      EXPECT_EQ(LookupGradSparseUpdateCpu(rule, h, missing, c.grad_output.data(), c.Csr(),
                                          static_cast<const float*>(nullptr), Combiner::kSum,
                                          BoundsCheck::kError)
                    .code(),
                Status::Code::kInvalidArgument);
    }
    EXPECT_EQ(before.weights, s.weights);
    EXPECT_EQ(before.slot0, s.slot0);
    EXPECT_EQ(before.slot1, s.slot1);
  }
}

TEST(LookupGradSparseUpdateTest, EmptyBatchAndNoValidIdChangeNothing) {
  for (SparseRule rule : kRules) {
    LookupCase<float, int32_t, int32_t> c =
        MakeCase<float, int32_t, int32_t>(CaseSpec{10, 4, 0, 3, 0.0, 0.0, 1});
    TableState<float> s = MakeTableState(rule, c, 2);
    const TableState<float> before = s;
    const SparseHyper<float> h = ToKernel<float>(rule, Hyper());
    EXPECT_TRUE(
        Fused(rule, h, &s, c, false, Combiner::kSum, BoundsCheck::kError, ParallelFor()).ok());
    LookupCase<float, int32_t, int32_t> all_invalid =
        MakeCase<float, int32_t, int32_t>(CaseSpec{10, 4, 6, 3, 0.0, 1.0, 3});
    EXPECT_TRUE(
        Fused(rule, h, &s, all_invalid, true, Combiner::kMean, BoundsCheck::kSkip, ParallelFor())
            .ok());
    EXPECT_EQ(before.weights, s.weights);
    EXPECT_EQ(before.slot0, s.slot0);
    EXPECT_EQ(before.slot1, s.slot1);
  }
}

}  // namespace
}  // namespace distributed_embeddings
