// Test support for half-precision tables, shared by the CPU and CUDA suites: a random case in a
// half type built from a double one, and the double case holding exactly the values the kernels
// see (the half inputs widened), so the double reference of lookup_test_util.h applies to it.
#ifndef DISTRIBUTED_EMBEDDINGS_EMBEDDING_KERNELS_HALF_TEST_UTIL_H_
#define DISTRIBUTED_EMBEDDINGS_EMBEDDING_KERNELS_HALF_TEST_UTIL_H_

#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "embedding/kernels/half.h"
#include "embedding/kernels/lookup_test_util.h"
#include "gtest/gtest.h"

namespace distributed_embeddings {
namespace testing {

template <typename U>
U FromDouble(double value) {
  if constexpr (std::is_same_v<U, Float16>) {
    return RoundToFloat16(static_cast<float>(value));
  } else if constexpr (std::is_same_v<U, BFloat16>) {
    return RoundToBFloat16(static_cast<float>(value));
  } else {
    return static_cast<U>(value);
  }
}

template <typename U>
double ToDouble(U value) {
  return static_cast<double>(Widen(value));
}

// Relative precision of a type's stored results: half an ulp at 1.
template <typename U>
double HalfUlp() {
  if constexpr (std::is_same_v<U, Float16>) return std::ldexp(1.0, -11);
  if constexpr (std::is_same_v<U, BFloat16>) return std::ldexp(1.0, -8);
  return std::ldexp(1.0, -24);
}

// A case with a table of T and grads and weights of OutT, plus `exact`: the same case in double,
// holding the widened values.
template <typename T, typename OutT, typename IdT, typename OffsetT>
struct HalfCase {
  LookupCase<double, IdT, OffsetT> exact;
  std::vector<T> params;
  std::vector<OutT> grad_output;
  std::vector<OutT> weights;
};

template <typename T, typename OutT, typename IdT, typename OffsetT>
HalfCase<T, OutT, IdT, OffsetT> MakeHalfCase(const CaseSpec& spec) {
  HalfCase<T, OutT, IdT, OffsetT> c;
  c.exact = MakeCase<double, IdT, OffsetT>(spec);
  const auto narrow = [](std::vector<double>* values, auto* narrowed) {
    using U = typename std::remove_pointer_t<decltype(narrowed)>::value_type;
    narrowed->clear();
    for (double& v : *values) {
      narrowed->push_back(FromDouble<U>(v));
      v = ToDouble(narrowed->back());
    }
  };
  narrow(&c.exact.params, &c.params);
  narrow(&c.exact.grad_output, &c.grad_output);
  narrow(&c.exact.weights, &c.weights);
  return c;
}

// Every value of `actual` (of U) within the float summation error of `expected`, plus the rounding
// of a U result: summing k terms of magnitude <= 1 in float loses ~k float ulps.
template <typename U>
void ExpectNearRounded(const std::vector<double>& expected, const std::vector<U>& actual,
                       int64_t terms) {
  ASSERT_EQ(expected.size(), actual.size());
  const double float_error = 4e-7 * (1.0 + static_cast<double>(terms));
  for (size_t i = 0; i < expected.size(); ++i) {
    const double tolerance = (HalfUlp<U>() + float_error) * (1.0 + std::fabs(expected[i]));
    ASSERT_NEAR(expected[i], ToDouble(actual[i]), tolerance) << "at flat index " << i;
  }
}

}  // namespace testing
}  // namespace distributed_embeddings

#endif  // DISTRIBUTED_EMBEDDINGS_EMBEDDING_KERNELS_HALF_TEST_UTIL_H_
