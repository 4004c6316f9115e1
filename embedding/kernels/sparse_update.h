// Sparse optimizer updates: a table's gradient rows applied to the table and its optimizer state
// in one pass over the rows they name. The framework-free CPU API.
//
// The gradient is given as TensorFlow's IndexedSlices hold it: `num_indices` row indices and one
// gradient row of `width` values for each. Indices may repeat (a table looked up twice in one
// step); the rows of a repeated index are summed, in the order they come, before the rule sees
// them, so every row is updated once. Every index is checked before any memory is written: one
// outside [0, num_rows) is an InvalidArgument error and leaves table and state untouched.
//
// The rules are Keras 3's, written with Keras's float operations in Keras's order, so that with
// distinct indices a row ends bit for bit where Keras's own update of that row would put it:
//   SGD:              w -= g * lr
//   Adagrad:          a += g * g;  w -= (lr * g) / sqrt(a + epsilon)
//   row-wise Adagrad: a_row += mean(g * g);  w -= (lr * g) / sqrt(a_row + epsilon)
//                     (one accumulator per row, as FBGEMM's EXACT_ROWWISE_ADAGRAD, with Keras's
//                     epsilon placement: a width-1 table behaves as Adagrad)
//   lazy Adam:        m += (g - m) * (1 - beta1);  v += (g * g - v) * (1 - beta2);
//                     w -= (m * lr) / (sqrt(v) + epsilon), lr being the step's bias-corrected rate
// Rows without gradient keep their values and state: for SGD and Adagrad that is Keras's result
// too; for Adam it is the lazy rule (TF1's LazyAdamOptimizer, FBGEMM's and SOK's Adam).
#ifndef DISTRIBUTED_EMBEDDINGS_EMBEDDING_KERNELS_SPARSE_UPDATE_H_
#define DISTRIBUTED_EMBEDDINGS_EMBEDDING_KERNELS_SPARSE_UPDATE_H_

#include <cstdint>

#include "embedding/kernels/embedding_lookup.h"
#include "embedding/kernels/parallel.h"
#include "embedding/kernels/status.h"

namespace distributed_embeddings {

enum class SparseRule { kSgd, kAdagrad, kRowwiseAdagrad, kLazyAdam };

// How many state arrays each rule keeps, and whether they have one value per row (else one per
// table element).
int SparseRuleSlots(SparseRule rule);
bool SparseRuleSlotsPerRow(SparseRule rule);

// A step's hyperparameters, in the table's type (Keras casts them to the variable's dtype).
template <typename T>
struct SparseHyper {
  T learning_rate = 0;    // lazy Adam: the step's rate lr * sqrt(1 - beta2^t) / (1 - beta1^t)
  T epsilon = 0;          // Adagrad, row-wise Adagrad, lazy Adam
  T one_minus_beta1 = 0;  // lazy Adam
  T one_minus_beta2 = 0;  // lazy Adam
};

// The table [num_rows, width], row-major, and its rule's state: slots[0] is Adagrad's accumulator
// ([num_rows, width]; row-wise: [num_rows]) or Adam's first moment, slots[1] Adam's second.
template <typename T>
struct SparseTable {
  T* weights = nullptr;
  int64_t num_rows = 0;
  int64_t width = 0;
  T* slots[2] = {nullptr, nullptr};
};

// Applies `grad` ([num_indices, width]) at rows `indices` of `table` by `rule`. The table and its
// slots must not be read or written by anyone else during the call (the TensorFlow binding holds
// each variable's exclusive lock).
template <typename T, typename IdT>
Status SparseUpdateCpu(SparseRule rule, const SparseHyper<T>& hyper, const SparseTable<T>& table,
                       const IdT* indices, int64_t num_indices, const T* grad,
                       const ParallelFor& parallel_for = ParallelFor());

// The lookup's backward and the update in one pass, as FBGEMM fuses them: the gradient of a
// pooled lookup's output (`grad_output`, [csr.batch, width], of the bags `csr` with `weights`
// per id, or none) is summed per distinct id exactly as PooledLookupBackwardCpu
// (WeightedPooledLookupBackwardCpu) sums it, and each sum goes straight into `rule`'s update of
// its row, a few rows at a time, so the unique gradient is never written out and read back. The
// table ends bit for bit where the backward followed by SparseUpdateCpu would put it. The ids are
// checked as the backward checks them (`bounds_check`), before any memory is written; skipped ids
// update nothing.
template <typename T, typename IdT, typename OffsetT>
Status LookupGradSparseUpdateCpu(SparseRule rule, const SparseHyper<T>& hyper,
                                 const SparseTable<T>& table, const T* grad_output,
                                 const CsrIds<IdT, OffsetT>& csr, const T* weights,
                                 Combiner combiner, BoundsCheck bounds_check,
                                 const ParallelFor& parallel_for = ParallelFor());

}  // namespace distributed_embeddings

#endif  // DISTRIBUTED_EMBEDDINGS_EMBEDDING_KERNELS_SPARSE_UPDATE_H_
