// The rules the CPU and CUDA kernels must agree on, written once for host and device code: which
// ids are valid, what a mean divides by, and what a canonical COO index sequence is.
#ifndef DISTRIBUTED_EMBEDDINGS_EMBEDDING_KERNELS_LOOKUP_RULES_H_
#define DISTRIBUTED_EMBEDDINGS_EMBEDDING_KERNELS_LOOKUP_RULES_H_

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define DE_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DE_HOST_DEVICE inline
#endif

namespace distributed_embeddings {

// An id names a row when it is in [0, num_rows); any other id is an error, or skipped.
template <typename IdT>
DE_HOST_DEVICE bool InRange(IdT id, int64_t num_rows) {
  return id >= 0 && static_cast<int64_t>(id) < num_rows;
}

// A mean divides a bag's sum by its number of valid ids, and leaves a bag of 0 or 1 as it is (an
// empty bag stays zero, never NaN).
DE_HOST_DEVICE bool MeanDivides(int64_t valid) { return valid > 1; }

// What a divided bag (mean or sqrtn, MeanDivides) is divided by: its number of valid ids, or for
// sqrtn that number's square root (TensorFlow's sparse_segment_sqrt_n).
template <typename T>
DE_HOST_DEVICE T BagDivisor(int64_t valid, bool sqrtn) {
  using std::sqrt;
  return sqrtn ? sqrt(static_cast<T>(valid)) : static_cast<T>(valid);
}

// A weighted bag's sum is divided by the sum of its weights (mean) or the square root of the sum
// of their squares (sqrtn) unless that is zero: a bag whose weights sum to zero gives zeros, as
// an empty one does, never NaN or infinity.
template <typename T>
DE_HOST_DEVICE bool WeightedDivides(T denominator) {
  return denominator != T(0);
}

// A COO entry (row, col) of a [num_rows, num_cols] tensor lies inside it.
DE_HOST_DEVICE bool CooInBounds(int64_t row, int64_t col, int64_t num_rows, int64_t num_cols) {
  return row >= 0 && row < num_rows && col >= 0 && col < num_cols;
}

// Entries are in canonical order: strictly increasing in row-major order.
DE_HOST_DEVICE bool CooFollows(int64_t prev_row, int64_t prev_col, int64_t row, int64_t col) {
  return row > prev_row || (row == prev_row && col > prev_col);
}

}  // namespace distributed_embeddings

#endif  // DISTRIBUTED_EMBEDDINGS_EMBEDDING_KERNELS_LOOKUP_RULES_H_
