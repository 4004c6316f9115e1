// Tests of the half-precision conversions (half.h) against IEEE definitions computed in double,
// and of the half-table CPU kernels against the double reference of lookup_test_util.h.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "embedding/kernels/embedding_lookup.h"
#include "embedding/kernels/half.h"
#include "embedding/kernels/half_test_util.h"
#include "embedding/kernels/lookup_test_util.h"
#include "gtest/gtest.h"

namespace distributed_embeddings {
namespace {

using ::distributed_embeddings::testing::CaseSpec;
using ::distributed_embeddings::testing::ExpectNearRounded;
using ::distributed_embeddings::testing::ForEachCpuLoopBuild;
using ::distributed_embeddings::testing::MakeHalfCase;
using ::distributed_embeddings::testing::ReferenceBackward;
using ::distributed_embeddings::testing::ReferenceForward;
using ::distributed_embeddings::testing::StandardSpecs;
using ::distributed_embeddings::testing::ThreadedParallelFor;

// The value of binary16 bit pattern `bits` from the IEEE 754 definition.
double Float16Value(uint16_t bits) {
  const int sign = bits >> 15 ? -1 : 1;
  const int exponent = (bits >> 10) & 0x1f;
  const int mantissa = bits & 0x3ff;
  if (exponent == 0x1f) {
    return mantissa ? std::numeric_limits<double>::quiet_NaN()
                    : sign * std::numeric_limits<double>::infinity();
  }
  if (exponent == 0) return sign * std::ldexp(mantissa, -24);
  return sign * std::ldexp(1024 + mantissa, exponent - 25);
}

double BFloat16Value(uint16_t bits) {
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &wide, sizeof(value));
  return value;
}

TEST(HalfConversionTest, WideningIsExactForEveryBitPattern) {
  for (uint32_t bits = 0; bits <= 0xffff; ++bits) {
    const uint16_t b = static_cast<uint16_t>(bits);
    const double f16 = Float16Value(b);
    const float widened = Widen(Float16{b});
    if (std::isnan(f16)) {
      EXPECT_TRUE(std::isnan(widened)) << bits;
    } else {
      ASSERT_EQ(static_cast<double>(widened), f16) << "Float16 bits " << bits;
      ASSERT_EQ(std::signbit(widened), std::signbit(f16)) << bits;
    }
    const double bf16 = BFloat16Value(b);
    const float bwidened = Widen(BFloat16{b});
    if (std::isnan(bf16)) {
      EXPECT_TRUE(std::isnan(bwidened)) << bits;
    } else {
      ASSERT_EQ(static_cast<double>(bwidened), bf16) << "BFloat16 bits " << bits;
    }
  }
}

// The nearest finite value of a type to x among `finite` (sorted, non-negative, with their bit
// patterns), ties to the even pattern; infinity past the rounding threshold `overflow`.
struct Nearest {
  std::vector<std::pair<double, uint16_t>> finite;
  double overflow;
  uint16_t infinity;

  uint16_t Of(double x) const {
    const uint16_t sign = std::signbit(x) ? 0x8000 : 0;
    const double magnitude = std::fabs(x);
    if (magnitude >= overflow) return sign | infinity;
    auto above =
        std::lower_bound(finite.begin(), finite.end(), std::make_pair(magnitude, uint16_t{0}));
    if (above == finite.begin()) return sign | above->second;
    auto below = above - 1;
    if (above == finite.end()) return sign | below->second;
    const double up = above->first - magnitude, down = magnitude - below->first;
    if (up < down) return sign | above->second;
    if (down < up) return sign | below->second;
    return sign | ((below->second & 1) == 0 ? below->second : above->second);
  }
};

template <typename ValueOf>
Nearest MakeNearest(const ValueOf& value_of, double overflow, uint16_t infinity) {
  Nearest nearest{{}, overflow, infinity};
  for (uint32_t bits = 0; bits < infinity; ++bits) {
    nearest.finite.emplace_back(value_of(static_cast<uint16_t>(bits)), static_cast<uint16_t>(bits));
  }
  return nearest;
}

// Random floats: uniform bit patterns (every exponent), values around the type's range and its
// midpoints (where ties happen), and the special values.
std::vector<float> ProbeFloats(double (*value_of)(uint16_t), uint16_t infinity) {
  std::vector<float> probes = {0.0f,
                               -0.0f,
                               std::numeric_limits<float>::infinity(),
                               -std::numeric_limits<float>::infinity(),
                               std::numeric_limits<float>::denorm_min(),
                               std::numeric_limits<float>::max()};
  std::mt19937 rng(7);
  for (int i = 0; i < 200000; ++i) {
    const uint32_t bits = rng();
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    if (!std::isnan(f)) probes.push_back(f);
  }
  for (uint32_t bits = 0; bits + 1 < infinity; ++bits) {
    const double low = value_of(static_cast<uint16_t>(bits));
    const double high = value_of(static_cast<uint16_t>(bits + 1));
    probes.push_back(static_cast<float>((low + high) / 2));  // a tie when float holds it
    probes.push_back(static_cast<float>(low + (high - low) * 0.25));
    probes.push_back(-static_cast<float>(low + (high - low) * 0.75));
  }
  return probes;
}

TEST(HalfConversionTest, Float16RoundsToNearestEven) {
  // 65520 = 65504 + half an ulp: from there on, round to nearest even gives infinity.
  const Nearest nearest = MakeNearest(Float16Value, 65520.0, 0x7c00);
  for (float f : ProbeFloats(Float16Value, 0x7c00)) {
    ASSERT_EQ(RoundToFloat16(f).bits, nearest.Of(f)) << "float " << f;
  }
  EXPECT_TRUE(std::isnan(Widen(RoundToFloat16(std::numeric_limits<float>::quiet_NaN()))));
}

TEST(HalfConversionTest, BFloat16RoundsToNearestEven) {
  const double max_finite = BFloat16Value(0x7f7f);
  const double overflow = max_finite + (max_finite - BFloat16Value(0x7f7e)) / 2;
  const Nearest nearest = MakeNearest(BFloat16Value, overflow, 0x7f80);
  for (float f : ProbeFloats(BFloat16Value, 0x7f80)) {
    ASSERT_EQ(RoundToBFloat16(f).bits, nearest.Of(f)) << "float " << f;
  }
  EXPECT_TRUE(std::isnan(Widen(RoundToBFloat16(std::numeric_limits<float>::quiet_NaN()))));
}

template <typename T_, typename OutT_, typename IdT_, typename OffsetT_>
struct Types {
  using T = T_;
  using OutT = OutT_;
  using IdT = IdT_;
  using OffsetT = OffsetT_;
};

template <typename P>
class HalfLookupCpuTest : public ::testing::Test {};

using HalfTypes = ::testing::Types<
    Types<Float16, Float16, int32_t, int64_t>, Types<Float16, float, int64_t, int32_t>,
    Types<BFloat16, BFloat16, int64_t, int64_t>, Types<BFloat16, float, int32_t, int32_t>>;
TYPED_TEST_SUITE(HalfLookupCpuTest, HalfTypes);

template <typename P>
void CheckHalfForwardAndBackward(double invalid_fraction, BoundsCheck mode) {
  using T = typename P::T;
  using OutT = typename P::OutT;
  using IdT = typename P::IdT;
  using OffsetT = typename P::OffsetT;
  for (const CaseSpec& spec : StandardSpecs(invalid_fraction)) {
    const auto c = MakeHalfCase<T, OutT, IdT, OffsetT>(spec);
    const auto& exact = c.exact;
    const int64_t nnz = static_cast<int64_t>(exact.ids.size());
    for (Combiner combiner : {Combiner::kSum, Combiner::kMean, Combiner::kSqrtn}) {
      for (bool weighted : {false, true}) {
        for (int threads : {1, 3}) {
          SCOPED_TRACE(::testing::Message()
                       << "seed " << spec.seed << " combiner " << static_cast<int>(combiner)
                       << " weighted " << weighted << " threads " << threads);
          const ParallelFor pf = threads > 1 ? ThreadedParallelFor(threads) : ParallelFor();
          const OutT* weights = weighted ? c.weights.data() : nullptr;
          std::vector<OutT> output(exact.batch() * exact.width, testing::FromDouble<OutT>(-7.0));
          ASSERT_TRUE(HalfPooledLookupForwardCpu(c.params.data(), exact.num_rows, exact.width,
                                                 exact.Csr(), weights, combiner, mode,
                                                 output.data(), pf)
                          .ok());
          ExpectNearRounded(ReferenceForward(exact, combiner, weighted), output, spec.max_hotness);

          const int64_t capacity = MaxUniqueIds(nnz, exact.num_rows);
          std::vector<IdT> unique_ids(capacity);
          std::vector<T> unique_grad(capacity * exact.width);
          int64_t num_unique = -1;
          ASSERT_TRUE(HalfPooledLookupBackwardCpu(
                          c.grad_output.data(), exact.num_rows, exact.width, exact.Csr(), weights,
                          combiner, mode, unique_ids.data(), unique_grad.data(), &num_unique, pf)
                          .ok());
          // Scatter the sparse gradient into a dense one; every id once, only valid ids.
          std::set<int64_t> expected_ids, seen;
          for (IdT id : exact.ids) {
            if (testing::Valid(id, exact.num_rows)) expected_ids.insert(id);
          }
          ASSERT_EQ(num_unique, static_cast<int64_t>(expected_ids.size()));
          std::vector<T> dense(exact.num_rows * exact.width, testing::FromDouble<T>(0.0));
          for (int64_t u = 0; u < num_unique; ++u) {
            const int64_t id = unique_ids[u];
            ASSERT_TRUE(expected_ids.count(id) && seen.insert(id).second) << "id " << id;
            for (int64_t w = 0; w < exact.width; ++w) {
              dense[id * exact.width + w] = unique_grad[u * exact.width + w];
            }
          }
          ExpectNearRounded(ReferenceBackward(exact, combiner, weighted), dense, nnz);
        }
      }
    }
  }
}

TYPED_TEST(HalfLookupCpuTest, ForwardAndBackwardMatchReference) {
  ForEachCpuLoopBuild([] { CheckHalfForwardAndBackward<TypeParam>(0.0, BoundsCheck::kError); });
}

TYPED_TEST(HalfLookupCpuTest, SkipModeIgnoresInvalidIds) {
  ForEachCpuLoopBuild([] { CheckHalfForwardAndBackward<TypeParam>(0.1, BoundsCheck::kSkip); });
}

TYPED_TEST(HalfLookupCpuTest, RejectsBadIdsBeforeWritingAnything) {
  using T = typename TypeParam::T;
  using OutT = typename TypeParam::OutT;
  using IdT = typename TypeParam::IdT;
  using OffsetT = typename TypeParam::OffsetT;
  const std::vector<T> params(4 * 2, testing::FromDouble<T>(1.0));
  const std::vector<IdT> ids = {0, 4};
  const std::vector<OffsetT> splits = {0, 1, 2};
  const CsrIds<IdT, OffsetT> csr{ids.data(), 2, splits.data(), 2};
  std::vector<OutT> output(2 * 2, testing::FromDouble<OutT>(3.0));
  const Status status = HalfPooledLookupForwardCpu<T, OutT>(
      params.data(), 4, 2, csr, nullptr, Combiner::kSum, BoundsCheck::kError, output.data());
  EXPECT_EQ(status.code(), Status::Code::kInvalidArgument);
  EXPECT_NE(status.message().find("ids[1] = 4"), std::string::npos) << status.message();
  for (OutT value : output) EXPECT_EQ(testing::ToDouble(value), 3.0);

  std::vector<IdT> unique_ids(2);
  std::vector<T> unique_grad(2 * 2);
  int64_t num_unique = -1;
  const std::vector<OutT> grad(2 * 2, testing::FromDouble<OutT>(1.0));
  EXPECT_EQ(HalfPooledLookupBackwardCpu(grad.data(), 4, 2, csr, static_cast<const OutT*>(nullptr),
                                        Combiner::kSum, BoundsCheck::kError, unique_ids.data(),
                                        unique_grad.data(), &num_unique)
                .code(),
            Status::Code::kInvalidArgument);
}

}  // namespace
}  // namespace distributed_embeddings
