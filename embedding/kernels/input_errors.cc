#include "embedding/kernels/input_errors.h"

#include <string>

namespace distributed_embeddings {
namespace {

std::string Str(int64_t value) { return std::to_string(value); }

}  // namespace

Status IdOutOfRangeError(int64_t position, int64_t id, int64_t num_rows) {
  return Status::InvalidArgument("'ids' must be in [0, " + Str(num_rows) + "), the rows of " +
                                 "'params'; got ids[" + Str(position) + "] = " + Str(id) + ".");
}

Status RowSplitsStartError(int64_t first) {
  return Status::InvalidArgument("'row_splits' must start at 0; got row_splits[0] = " + Str(first) +
                                 ".");
}

Status RowSplitsDecreasingError(int64_t index, int64_t value, int64_t next) {
  return Status::InvalidArgument("'row_splits' must be non-decreasing; got row_splits[" +
                                 Str(index) + "] = " + Str(value) + " > row_splits[" +
                                 Str(index + 1) + "] = " + Str(next) + ".");
}

Status RowSplitsEndError(int64_t batch, int64_t last, int64_t nnz) {
  return Status::InvalidArgument("'row_splits' must end at " + Str(nnz) +
                                 ", the number of 'ids'; got row_splits[" + Str(batch) +
                                 "] = " + Str(last) + ".");
}

Status NnzTooLargeError(int64_t nnz, int64_t max_offset) {
  return Status::InvalidArgument("'ids' must have at most " + Str(max_offset) +
                                 " elements for 32-bit row_splits; got " + Str(nnz) +
                                 " (use int64 row_splits).");
}

Status CooIndexOutOfBoundsError(int64_t position, int64_t row, int64_t col, int64_t num_rows,
                                int64_t num_cols) {
  return Status::InvalidArgument("'indices' must lie in [0, " + Str(num_rows) + ") x [0, " +
                                 Str(num_cols) + "), the dense shape; got indices[" +
                                 Str(position) + "] = [" + Str(row) + ", " + Str(col) + "].");
}

Status CooIndexOrderError(int64_t position, int64_t row, int64_t col, int64_t prev_row,
                          int64_t prev_col) {
  return Status::InvalidArgument(
      "'indices' must be in strictly increasing row-major order; got indices[" + Str(position) +
      "] = [" + Str(row) + ", " + Str(col) + "] after [" + Str(prev_row) + ", " + Str(prev_col) +
      "] (possibly because the SparseTensor is not in canonical order: call tf.sparse.reorder).");
}

}  // namespace distributed_embeddings
