// Pooled embedding lookups over CSR ids: the framework-free CPU API.
//
// A batch of `batch` bags is given in CSR form: bag b holds ids[row_splits[b]] ..
// ids[row_splits[b + 1] - 1]. The forward pass writes, for each bag, the sum or the mean of the
// table rows its ids name; the backward pass turns the gradient of that output into the sparse
// gradient of the table: the distinct ids that occur, each with its summed gradient row.
//
// Semantics beyond TensorFlow's reference ops:
//   * an empty bag yields a row of zeros for every combiner (never NaN), and so does a weighted bag
//     whose weights sum to zero (mean) or are all zero (sqrtn);
//   * every id and every row_splits entry is checked before any table or output memory is touched:
//     with BoundsCheck::kError a bad id is an InvalidArgument error; with BoundsCheck::kSkip a bad
//     id contributes nothing and a mean divides by the number of valid ids. Malformed row_splits
//     are an error in both modes.
// Results are deterministic: sums are accumulated in id order, the order TensorFlow's own CPU
// reductions use, so dense fixed-hotness lookups match tf.reduce_sum(tf.gather(...)) bit for bit.
#ifndef DISTRIBUTED_EMBEDDINGS_EMBEDDING_KERNELS_EMBEDDING_LOOKUP_H_
#define DISTRIBUTED_EMBEDDINGS_EMBEDDING_KERNELS_EMBEDDING_LOOKUP_H_

#include <algorithm>
#include <cstdint>

#include "embedding/kernels/half.h"
#include "embedding/kernels/parallel.h"
#include "embedding/kernels/status.h"

namespace distributed_embeddings {

// kSqrtn divides a bag's sum by the square root of its number of ids (TensorFlow's 'sqrtn'); with
// weights, by the square root of the sum of the squared weights.
enum class Combiner { kSum, kMean, kSqrtn };

// What a kernel does with an id outside [0, num_rows).
enum class BoundsCheck { kError, kSkip };

// The ids of one pooled lookup in CSR form. `row_splits` has batch + 1 entries.
template <typename IdT, typename OffsetT>
struct CsrIds {
  const IdT* ids = nullptr;
  int64_t nnz = 0;
  const OffsetT* row_splits = nullptr;
  int64_t batch = 0;
};

// The capacity, in rows, that PooledLookupBackward* needs for its unique outputs.
inline int64_t MaxUniqueIds(int64_t nnz, int64_t num_rows) { return std::min(nnz, num_rows); }

// ValidateCsrIds checks that `csr.row_splits` starts at 0, never decreases and ends at `csr.nnz`,
// and, when `bounds_check` is kError, that every id lies in [0, num_rows).
template <typename IdT, typename OffsetT>
Status ValidateCsrIds(const CsrIds<IdT, OffsetT>& csr, int64_t num_rows, BoundsCheck bounds_check);

// PooledLookupForwardCpu writes output[b, :] = combiner(params[id, :] for id in bag b) for every
// bag, where `params` is a row-major [num_rows, width] table and `output` is [csr.batch, width].
template <typename T, typename IdT, typename OffsetT>
Status PooledLookupForwardCpu(const T* params, int64_t num_rows, int64_t width,
                              const CsrIds<IdT, OffsetT>& csr, Combiner combiner,
                              BoundsCheck bounds_check, T* output,
                              const ParallelFor& parallel_for = ParallelFor());

// PooledLookupBackwardCpu turns `grad_output` ([csr.batch, width], the gradient of the forward
// output) into the table's sparse gradient: `*num_unique` distinct ids in order of first occurrence
// in `unique_ids`, and in row u of `unique_grad` ([*, width]) the sum of the gradients of every
// occurrence of unique_ids[u]. Both outputs need room for MaxUniqueIds(csr.nnz, num_rows) rows.
template <typename T, typename IdT, typename OffsetT>
Status PooledLookupBackwardCpu(const T* grad_output, int64_t num_rows, int64_t width,
                               const CsrIds<IdT, OffsetT>& csr, Combiner combiner,
                               BoundsCheck bounds_check, IdT* unique_ids, T* unique_grad,
                               int64_t* num_unique,
                               const ParallelFor& parallel_for = ParallelFor());

// Weighted bags: `weights` has one value per id (csr.nnz of them, aligned with csr.ids). Bag b's
// output is sum_j w_j * params[id_j, :] divided, for kMean, by sum_j w_j and, for kSqrtn, by
// sqrt(sum_j w_j^2), over its valid ids (TensorFlow's embedding_lookup_sparse with sp_weights). A
// bag whose divisor is zero gives zeros. Weights are data, never checked: NaN or infinity in a
// weight reaches that bag's output.
template <typename T, typename IdT, typename OffsetT>
Status WeightedPooledLookupForwardCpu(const T* params, int64_t num_rows, int64_t width,
                                      const CsrIds<IdT, OffsetT>& csr, const T* weights,
                                      Combiner combiner, BoundsCheck bounds_check, T* output,
                                      const ParallelFor& parallel_for = ParallelFor());

// The table's sparse gradient of WeightedPooledLookupForwardCpu, laid out as
// PooledLookupBackwardCpu's: occurrence j of unique_ids[u] in bag b adds
// w_j * (grad_output[b, :] / divisor_b) to unique_grad[u], in occurrence order. (The gradient with
// respect to the weights needs the table rows; the framework layer computes it.)
template <typename T, typename IdT, typename OffsetT>
Status WeightedPooledLookupBackwardCpu(const T* grad_output, int64_t num_rows, int64_t width,
                                       const CsrIds<IdT, OffsetT>& csr, const T* weights,
                                       Combiner combiner, BoundsCheck bounds_check, IdT* unique_ids,
                                       T* unique_grad, int64_t* num_unique,
                                       const ParallelFor& parallel_for = ParallelFor());

// Half-precision tables (half.h): `params` holds Float16 or BFloat16 rows, read in place. A bag
// is summed in float, in id order, then divided (mean, sqrtn) and rounded once into `output`,
// whose type is the table's or float. `weights` is null for unweighted bags, else one weight per
// id of the output's type. Checks, empty bags and divisors follow the functions above.
template <typename T, typename OutT, typename IdT, typename OffsetT>
Status HalfPooledLookupForwardCpu(const T* params, int64_t num_rows, int64_t width,
                                  const CsrIds<IdT, OffsetT>& csr, const OutT* weights,
                                  Combiner combiner, BoundsCheck bounds_check, OutT* output,
                                  const ParallelFor& parallel_for = ParallelFor());

// The table's sparse gradient of HalfPooledLookupForwardCpu, laid out as PooledLookupBackwardCpu's:
// `grad_output` and `weights` (null for unweighted bags) of the forward's output type, each row of
// `unique_grad` (the table's type) summed in float and rounded once.
template <typename T, typename GradT, typename IdT, typename OffsetT>
Status HalfPooledLookupBackwardCpu(const GradT* grad_output, int64_t num_rows, int64_t width,
                                   const CsrIds<IdT, OffsetT>& csr, const GradT* weights,
                                   Combiner combiner, BoundsCheck bounds_check, IdT* unique_ids,
                                   T* unique_grad, int64_t* num_unique,
                                   const ParallelFor& parallel_for = ParallelFor());

// CooToRowSplitsCpu turns the [nnz, 2] row-major `indices` of a 2-D sparse tensor with dense shape
// [num_rows_dense, num_cols_dense] into `row_splits` (num_rows_dense + 1 entries). Indices must be
// in bounds and in strictly increasing row-major order (tf.sparse.reorder's canonical order).
template <typename OffsetT>
Status CooToRowSplitsCpu(const int64_t* indices, int64_t nnz, int64_t num_rows_dense,
                         int64_t num_cols_dense, OffsetT* row_splits);

// On x86-64 the CPU kernels run an AVX2 build of their loops when the CPU has AVX2 (same results,
// bit for bit) and a portable build otherwise. Tests force the portable build to cover both.
void ForcePortableCpuLoopsForTesting(bool portable);

}  // namespace distributed_embeddings

#endif  // DISTRIBUTED_EMBEDDINGS_EMBEDDING_KERNELS_EMBEDDING_LOOKUP_H_
