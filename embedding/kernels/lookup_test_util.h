// Test support shared by the CPU and CUDA kernel suites: random CSR cases and a naive reference
// that accumulates in double, independent of the kernels' own summation order.
#ifndef DISTRIBUTED_EMBEDDINGS_EMBEDDING_KERNELS_LOOKUP_TEST_UTIL_H_
#define DISTRIBUTED_EMBEDDINGS_EMBEDDING_KERNELS_LOOKUP_TEST_UTIL_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <map>
#include <random>
#include <set>
#include <thread>
#include <vector>

#include "embedding/kernels/embedding_lookup.h"
#include "gtest/gtest.h"

namespace distributed_embeddings {
namespace testing {

struct CaseSpec {
  int64_t num_rows;
  int64_t width;
  int64_t batch;
  int64_t max_hotness;      // bag lengths are uniform in [0, max_hotness]
  double empty_fraction;    // share of bags forced empty
  double invalid_fraction;  // share of ids replaced by out-of-range values
  uint32_t seed;
};

template <typename T, typename IdT, typename OffsetT>
struct LookupCase {
  int64_t num_rows = 0;
  int64_t width = 0;
  std::vector<T> params;
  std::vector<IdT> ids;
  std::vector<OffsetT> row_splits;
  std::vector<T> grad_output;
  std::vector<T> weights;  // one per id: mostly in [0.25, 1.25), a tenth exactly zero

  CsrIds<IdT, OffsetT> Csr() const {
    return CsrIds<IdT, OffsetT>{ids.data(), static_cast<int64_t>(ids.size()), row_splits.data(),
                                static_cast<int64_t>(row_splits.size()) - 1};
  }
  int64_t batch() const { return static_cast<int64_t>(row_splits.size()) - 1; }
};

template <typename T, typename IdT, typename OffsetT>
LookupCase<T, IdT, OffsetT> MakeCase(const CaseSpec& spec) {
  std::mt19937_64 rng(spec.seed);
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  LookupCase<T, IdT, OffsetT> c;
  c.num_rows = spec.num_rows;
  c.width = spec.width;
  c.params.resize(spec.num_rows * spec.width);
  for (auto& p : c.params) p = static_cast<T>(unit(rng) * 2.0 - 1.0);
  c.row_splits.push_back(0);
  for (int64_t b = 0; b < spec.batch; ++b) {
    int64_t len = static_cast<int64_t>(unit(rng) * (spec.max_hotness + 1));
    if (len > spec.max_hotness) len = spec.max_hotness;
    if (unit(rng) < spec.empty_fraction) len = 0;
    for (int64_t j = 0; j < len; ++j) {
      // Skewed ids so that duplicates within and across bags are common.
      const double r = unit(rng);
      IdT id = static_cast<IdT>(static_cast<int64_t>(r * r * spec.num_rows) % spec.num_rows);
      if (unit(rng) < spec.invalid_fraction) {
        id = unit(rng) < 0.5
                 ? static_cast<IdT>(-1 - static_cast<int64_t>(unit(rng) * 5))
                 : static_cast<IdT>(spec.num_rows + static_cast<int64_t>(unit(rng) * 5));
      }
      c.ids.push_back(id);
    }
    c.row_splits.push_back(static_cast<OffsetT>(c.ids.size()));
  }
  c.grad_output.resize(spec.batch * spec.width);
  for (auto& g : c.grad_output) g = static_cast<T>(unit(rng) * 2.0 - 1.0);
  // Positive weights keep a weighted mean well conditioned; zeros make some bags all-zero.
  c.weights.resize(c.ids.size());
  for (auto& w : c.weights) w = unit(rng) < 0.1 ? T(0) : static_cast<T>(0.25 + unit(rng));
  return c;
}

// Bag b's divisor in double, for the combiner and (with `weighted`) the case's weights; 0 when the
// bag gives zeros, 1 when it is not divided.
template <typename T, typename IdT, typename OffsetT>
double ReferenceDivisor(const LookupCase<T, IdT, OffsetT>& c, Combiner combiner, bool weighted,
                        int64_t b) {
  if (combiner == Combiner::kSum) return 1.0;
  double total = 0.0;
  for (int64_t j = c.row_splits[b]; j < static_cast<int64_t>(c.row_splits[b + 1]); ++j) {
    if (!(c.ids[j] >= 0 && static_cast<int64_t>(c.ids[j]) < c.num_rows)) continue;
    const double w = weighted ? static_cast<double>(c.weights[j]) : 1.0;
    total += combiner == Combiner::kMean ? w : w * w;
  }
  if (combiner == Combiner::kSqrtn) total = std::sqrt(total);
  if (!weighted && total == 0.0) return 1.0;  // an empty bag: zeros either way
  return total;
}

inline bool Valid(int64_t id, int64_t num_rows) { return id >= 0 && id < num_rows; }

// output[b, w] in double; invalid ids are skipped (callers only pass them in kSkip cases).
template <typename T, typename IdT, typename OffsetT>
std::vector<double> ReferenceForward(const LookupCase<T, IdT, OffsetT>& c, Combiner combiner,
                                     bool weighted = false) {
  std::vector<double> out(c.batch() * c.width, 0.0);
  for (int64_t b = 0; b < c.batch(); ++b) {
    const double divisor = ReferenceDivisor(c, combiner, weighted, b);
    if (divisor == 0.0) continue;
    for (int64_t j = c.row_splits[b]; j < static_cast<int64_t>(c.row_splits[b + 1]); ++j) {
      const int64_t id = static_cast<int64_t>(c.ids[j]);
      if (!Valid(id, c.num_rows)) continue;
      const double w = weighted ? static_cast<double>(c.weights[j]) : 1.0;
      for (int64_t k = 0; k < c.width; ++k) {
        out[b * c.width + k] += w * c.params[id * c.width + k] / divisor;
      }
    }
  }
  return out;
}

// The dense [num_rows, width] table gradient, in double.
template <typename T, typename IdT, typename OffsetT>
std::vector<double> ReferenceBackward(const LookupCase<T, IdT, OffsetT>& c, Combiner combiner,
                                      bool weighted = false) {
  std::vector<double> grad(c.num_rows * c.width, 0.0);
  for (int64_t b = 0; b < c.batch(); ++b) {
    const double divisor = ReferenceDivisor(c, combiner, weighted, b);
    if (divisor == 0.0) continue;
    for (int64_t j = c.row_splits[b]; j < static_cast<int64_t>(c.row_splits[b + 1]); ++j) {
      const int64_t id = static_cast<int64_t>(c.ids[j]);
      if (!Valid(id, c.num_rows)) continue;
      const double w = weighted ? static_cast<double>(c.weights[j]) : 1.0;
      for (int64_t k = 0; k < c.width; ++k) {
        grad[id * c.width + k] += c.grad_output[b * c.width + k] * w / divisor;
      }
    }
  }
  return grad;
}

template <typename T>
double Tolerance() {
  return sizeof(T) == 4 ? 2e-5 : 1e-12;
}

template <typename T>
void ExpectNear(const std::vector<double>& expected, const std::vector<T>& actual,
                int64_t max_hotness) {
  ASSERT_EQ(expected.size(), actual.size());
  // Summing k values of magnitude <= 1 in T loses at most ~k ulps.
  const double tol = Tolerance<T>() * (1.0 + static_cast<double>(max_hotness) / 16.0);
  for (size_t i = 0; i < expected.size(); ++i) {
    ASSERT_NEAR(expected[i], static_cast<double>(actual[i]), tol * (1.0 + std::fabs(expected[i])))
        << "at flat index " << i;
  }
}

// How often the most frequent valid id occurs (at least 1): its gradient row sums that many terms.
template <typename T, typename IdT, typename OffsetT>
int64_t MaxOccurrences(const LookupCase<T, IdT, OffsetT>& c) {
  std::map<int64_t, int64_t> occurrences;
  int64_t most = 1;
  for (IdT id : c.ids) {
    if (!Valid(static_cast<int64_t>(id), c.num_rows)) continue;
    most = std::max(most, ++occurrences[static_cast<int64_t>(id)]);
  }
  return most;
}

// Checks the sparse gradient (unique ids + rows) against the dense reference gradient.
template <typename T, typename IdT, typename OffsetT>
void ExpectSparseGradient(const LookupCase<T, IdT, OffsetT>& c, Combiner combiner,
                          const std::vector<IdT>& unique_ids, const std::vector<T>& unique_grad,
                          int64_t num_unique, int64_t max_hotness, bool weighted = false) {
  std::set<int64_t> expected_ids;
  for (IdT id : c.ids) {
    if (Valid(static_cast<int64_t>(id), c.num_rows)) expected_ids.insert(static_cast<int64_t>(id));
  }
  ASSERT_EQ(num_unique, static_cast<int64_t>(expected_ids.size()));
  std::set<int64_t> seen;
  std::vector<T> dense(c.num_rows * c.width, T(0));
  for (int64_t u = 0; u < num_unique; ++u) {
    const int64_t id = static_cast<int64_t>(unique_ids[u]);
    ASSERT_TRUE(expected_ids.count(id)) << "unexpected id " << id;
    ASSERT_TRUE(seen.insert(id).second) << "id " << id << " appears twice";
    for (int64_t w = 0; w < c.width; ++w) dense[id * c.width + w] = unique_grad[u * c.width + w];
  }
  // Each row sums one term per occurrence of its id: the error grows with the most frequent id.
  ExpectNear(ReferenceBackward(c, combiner, weighted), dense, MaxOccurrences(c));
}

// A ParallelFor over std::threads, so tests exercise the multi-threaded split.
inline ParallelFor ThreadedParallelFor(int threads) {
  return [threads](int64_t total, int64_t, const std::function<void(int64_t, int64_t)>& work) {
    std::vector<std::thread> pool;
    const int64_t chunk = (total + threads - 1) / threads;
    for (int64_t begin = 0; begin < total; begin += chunk) {
      pool.emplace_back(work, begin, std::min(total, begin + chunk));
    }
    for (auto& t : pool) t.join();
  };
}

// Runs `check` with the CPU kernels' default loops (AVX2 where the CPU has it) and again with the
// portable ones.
template <typename Check>
void ForEachCpuLoopBuild(const Check& check) {
  for (bool portable : {false, true}) {
    SCOPED_TRACE(portable ? "portable loops" : "default loops");
    ForcePortableCpuLoopsForTesting(portable);
    check();
    ForcePortableCpuLoopsForTesting(false);
  }
}

// Sizes every suite runs: empty batch, empty bags, width 1, widths off multiples of 4 and 32,
// hotness into the thousands.
inline std::vector<CaseSpec> StandardSpecs(double invalid_fraction) {
  std::vector<CaseSpec> specs = {
      {10, 4, 0, 3, 0.0, invalid_fraction, 1},        // empty batch
      {10, 1, 5, 3, 0.5, invalid_fraction, 2},        // width 1, many empty bags
      {7, 3, 9, 5, 0.2, invalid_fraction, 3},         // width not a multiple of 4
      {50, 33, 17, 8, 0.1, invalid_fraction, 4},      // width just past a warp
      {1000, 64, 64, 10, 0.0, invalid_fraction, 5},   // typical
      {300, 130, 23, 40, 0.1, invalid_fraction, 6},   // wide rows
      {5, 16, 4, 3000, 0.0, invalid_fraction, 7},     // hotness in the thousands, tiny vocab
      {100000, 8, 200, 1, 0.0, invalid_fraction, 8},  // one-hot over a large vocab
      {1, 2, 6, 4, 0.3, invalid_fraction, 9},         // a single row
      {400, 32, 30, 40, 0.1, invalid_fraction, 10},   // CPU fixed-width loops: 32,
      {300, 128, 12, 25, 0.1, invalid_fraction, 11},  // 128 (two blocks of registers)
      {200, 256, 8, 20, 0.0, invalid_fraction, 12},   // and 256 (four)
  };
  std::mt19937 rng(42);
  for (uint32_t i = 0; i < 6; ++i) {  // random sizes
    specs.push_back({1 + static_cast<int64_t>(rng() % 500), 1 + static_cast<int64_t>(rng() % 70),
                     static_cast<int64_t>(rng() % 60), static_cast<int64_t>(rng() % 30), 0.1,
                     invalid_fraction, 100 + i});
  }
  return specs;
}

}  // namespace testing
}  // namespace distributed_embeddings

#endif  // DISTRIBUTED_EMBEDDINGS_EMBEDDING_KERNELS_LOOKUP_TEST_UTIL_H_
