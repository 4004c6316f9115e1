// libFuzzer target for the CPU entry points of the kernel library (float and half tables).
//
// The input bytes choose sizes, row_splits (often malformed), ids (often out of range), the
// combiner and the bounds-check mode, and COO indices. Every call must either succeed with the
// result of a naive double-precision reference, or fail exactly when the reference says the input
// is invalid; AddressSanitizer and UBSan (built in) catch any out-of-bounds access.
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "embedding/kernels/embedding_lookup.h"
#include "embedding/kernels/integer_lookup.h"

namespace {

using namespace distributed_embeddings;  // NOLINT: a test binary

// Consumes bytes from the fuzzer input; zeros once it runs out.
class Reader {
 public:
  Reader(const uint8_t* data, size_t size) : data_(data), size_(size) {}
  uint8_t Byte() { return pos_ < size_ ? data_[pos_++] : 0; }
  int64_t Small(int64_t bound) { return bound > 0 ? Byte() % bound : 0; }
  int64_t Signed() { return static_cast<int8_t>(Byte()); }

 private:
  const uint8_t* data_;
  size_t size_;
  size_t pos_ = 0;
};

void Check(bool condition, const char* what) {
  if (!condition) {
    std::fprintf(stderr, "lookup_fuzzer: %s\n", what);
    std::abort();
  }
}

void FuzzLookup(Reader& in) {
  const int64_t num_rows = in.Small(12);  // 0 allowed: every id is then out of range
  const int64_t width = 1 + in.Small(9);
  const int64_t batch = in.Small(10);
  const bool malformed_splits = in.Small(4) == 0;
  const Combiner combiner = in.Small(2) ? Combiner::kMean : Combiner::kSum;
  const BoundsCheck mode = in.Small(2) ? BoundsCheck::kSkip : BoundsCheck::kError;

  std::vector<int64_t> splits(batch + 1, 0);
  for (int64_t b = 0; b < batch; ++b) {
    splits[b + 1] = malformed_splits ? splits[b] + in.Signed() % 5 : splits[b] + in.Small(5);
  }
  if (malformed_splits && in.Small(2)) splits[0] = in.Signed() % 3;
  const int64_t nnz = malformed_splits ? in.Small(24) : splits[batch];
  std::vector<int64_t> ids(nnz);
  for (auto& id : ids) id = in.Small(3) ? in.Small(num_rows + 1) : in.Signed();
  std::vector<float> params(num_rows * width);
  for (size_t i = 0; i < params.size(); ++i) params[i] = static_cast<float>(i % 7) - 3.0f;

  // Independent validity: the documented rules, restated.
  bool splits_ok = splits[0] == 0 && splits[batch] == nnz;
  for (int64_t b = 0; b < batch; ++b) splits_ok = splits_ok && splits[b] <= splits[b + 1];
  bool ids_ok = true;
  for (int64_t id : ids) ids_ok = ids_ok && id >= 0 && id < num_rows;
  const bool valid = splits_ok && (ids_ok || mode == BoundsCheck::kSkip);

  const CsrIds<int64_t, int64_t> csr{ids.data(), nnz, splits.data(), batch};
  std::vector<float> output(batch * width, -1.0f);
  const Status forward =
      PooledLookupForwardCpu(params.data(), num_rows, width, csr, combiner, mode, output.data());
  Check(forward.ok() == valid, "forward validity differs from the reference");
  std::vector<float> grad_output(batch * width);
  for (size_t i = 0; i < grad_output.size(); ++i) grad_output[i] = 0.5f * static_cast<float>(i % 5);
  const int64_t capacity = MaxUniqueIds(nnz, num_rows);
  std::vector<int64_t> unique_ids(capacity);
  std::vector<float> unique_grad(capacity * width);
  int64_t num_unique = -1;
  const Status backward =
      PooledLookupBackwardCpu(grad_output.data(), num_rows, width, csr, combiner, mode,
                              unique_ids.data(), unique_grad.data(), &num_unique);
  Check(backward.ok() == valid, "backward validity differs from the reference");

  // The half-table kernels on the same input (small integers and halves: exact in every type):
  // the same verdict, and where valid the float kernels' results. Weights of one, when given,
  // change nothing.
  std::vector<BFloat16> half_params;
  for (float p : params) half_params.push_back(RoundToBFloat16(p));
  const std::vector<float> ones(nnz, 1.0f);
  const float* weights = in.Small(2) ? ones.data() : nullptr;
  std::vector<float> half_output(batch * width, -1.0f);
  const Status half_forward = HalfPooledLookupForwardCpu(
      half_params.data(), num_rows, width, csr, weights, combiner, mode, half_output.data());
  Check(half_forward.ok() == valid, "half forward validity differs from the reference");
  std::vector<int64_t> half_ids(capacity);
  std::vector<Float16> half_grad(capacity * width);
  int64_t half_unique = -1;
  const Status half_backward =
      HalfPooledLookupBackwardCpu(grad_output.data(), num_rows, width, csr, weights, combiner, mode,
                                  half_ids.data(), half_grad.data(), &half_unique);
  Check(half_backward.ok() == valid, "half backward validity differs from the reference");
  if (!valid) return;
  Check(half_output == output, "half forward value");
  Check(half_unique == num_unique, "half backward unique count");
  for (int64_t u = 0; u < num_unique; ++u) {
    Check(half_ids[u] == unique_ids[u], "half backward unique ids");
    for (int64_t w = 0; w < width; ++w) {
      Check(std::fabs(Widen(half_grad[u * width + w]) - unique_grad[u * width + w]) < 1e-2,
            "half gradient value");
    }
  }

  std::vector<double> dense_grad(num_rows * width, 0.0);
  for (int64_t b = 0; b < batch; ++b) {
    std::vector<int64_t> bag;
    for (int64_t j = splits[b]; j < splits[b + 1]; ++j) {
      if (ids[j] >= 0 && ids[j] < num_rows) bag.push_back(ids[j]);
    }
    const double scale = (combiner == Combiner::kMean && !bag.empty()) ? 1.0 / bag.size() : 1.0;
    for (int64_t w = 0; w < width; ++w) {
      double sum = 0.0;
      for (int64_t id : bag) sum += params[id * width + w];
      Check(std::fabs(sum * scale - output[b * width + w]) < 1e-3, "forward value");
      for (int64_t id : bag) dense_grad[id * width + w] += grad_output[b * width + w] * scale;
    }
  }
  Check(num_unique >= 0 && num_unique <= capacity, "num_unique out of range");
  std::vector<bool> seen(num_rows, false);
  for (int64_t u = 0; u < num_unique; ++u) {
    const int64_t id = unique_ids[u];
    Check(id >= 0 && id < num_rows && !seen[id], "unique id invalid or repeated");
    seen[id] = true;
    for (int64_t w = 0; w < width; ++w) {
      Check(std::fabs(dense_grad[id * width + w] - unique_grad[u * width + w]) < 1e-3,
            "gradient value");
      dense_grad[id * width + w] = 0.0;
    }
  }
  for (double g : dense_grad) Check(g == 0.0, "gradient of an id missing from unique_ids");
}

void FuzzCoo(Reader& in) {
  const int64_t rows = in.Small(6), cols = in.Small(6), nnz = in.Small(10);
  std::vector<int64_t> indices(2 * nnz);
  for (auto& x : indices) x = in.Small(4) ? in.Small(7) : in.Signed();
  bool ok = true;
  for (int64_t j = 0; j < nnz; ++j) {
    const int64_t r = indices[2 * j], c = indices[2 * j + 1];
    ok = ok && r >= 0 && r < rows && c >= 0 && c < cols;
    if (j > 0) {
      const int64_t pr = indices[2 * j - 2], pc = indices[2 * j - 1];
      ok = ok && (r > pr || (r == pr && c > pc));
    }
  }
  std::vector<int64_t> splits(rows + 1, -7);
  const Status status = CooToRowSplitsCpu(indices.data(), nnz, rows, cols, splits.data());
  Check(status.ok() == ok, "COO validity differs from the reference");
  if (!ok) return;
  for (int64_t r = 0; r <= rows; ++r) {
    int64_t count = 0;
    for (int64_t j = 0; j < nnz; ++j) count += indices[2 * j] < r;
    Check(splits[r] == count, "row_splits value");
  }
}

void FuzzIntegerLookup(Reader& in) {
  const int64_t max_tokens = 1 + in.Small(6);
  std::vector<int64_t> state(IntegerLookupStateSize(max_tokens));
  InitIntegerLookupState(state.data(), max_tokens);
  if (in.Small(8) == 0) state[0] = in.Signed();  // a corrupt vocabulary size
  const int64_t n = in.Small(16);
  std::vector<int64_t> keys(n), ids(n);
  for (auto& k : keys) k = in.Signed();
  const Status status = IntegerLookupCpu(state.data(), static_cast<int64_t>(state.size()),
                                         max_tokens, keys.data(), n, true, ids.data());
  Check(status.ok() == (state[0] >= 0 && state[0] <= max_tokens), "IntegerLookup validity");
  if (!status.ok()) return;
  for (int64_t i = 0; i < n; ++i) {
    Check(ids[i] >= 0 && ids[i] <= max_tokens, "IntegerLookup id out of range");
    for (int64_t j = 0; j < i; ++j) {
      if (keys[i] == keys[j]) {
        Check(ids[i] == ids[j], "IntegerLookup gave one key two ids");
      } else if (ids[i] != 0 && ids[j] != 0) {
        Check(ids[i] != ids[j], "IntegerLookup gave two keys one id");
      }
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  Reader in(data, size);
  switch (in.Small(3)) {
    case 0:
      FuzzLookup(in);
      break;
    case 1:
      FuzzCoo(in);
      break;
    default:
      FuzzIntegerLookup(in);
  }
  return 0;
}
