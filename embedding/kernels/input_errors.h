// Error messages shared by the CPU and CUDA kernels, so both devices report bad input alike.
//
// Wording: "'<arg>' must <rule>; got <value>." with ranges written half-open.
#ifndef DISTRIBUTED_EMBEDDINGS_EMBEDDING_KERNELS_INPUT_ERRORS_H_
#define DISTRIBUTED_EMBEDDINGS_EMBEDDING_KERNELS_INPUT_ERRORS_H_

#include <cstdint>

#include "embedding/kernels/status.h"

namespace distributed_embeddings {

Status IdOutOfRangeError(int64_t position, int64_t id, int64_t num_rows);
Status RowSplitsStartError(int64_t first);
Status RowSplitsDecreasingError(int64_t index, int64_t value, int64_t next);
Status RowSplitsEndError(int64_t batch, int64_t last, int64_t nnz);
Status NnzTooLargeError(int64_t nnz, int64_t max_offset);
Status CooIndexOutOfBoundsError(int64_t position, int64_t row, int64_t col, int64_t num_rows,
                                int64_t num_cols);
Status CooIndexOrderError(int64_t position, int64_t row, int64_t col, int64_t prev_row,
                          int64_t prev_col);

}  // namespace distributed_embeddings

#endif  // DISTRIBUTED_EMBEDDINGS_EMBEDDING_KERNELS_INPUT_ERRORS_H_
