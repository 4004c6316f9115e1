// Sparse optimizer updates: the framework-free CUDA API.
//
// Same rules and semantics as sparse_update.h, with device pointers, a stream and caller-provided
// device scratch (`workspace`, sized by SparseUpdateCudaWorkspaceBytes). Every index is checked on
// the device first; the verdict comes back in one copy (the call's only synchronization) and an
// error, worded as the CPU's, leaves table and state untouched. A stable radix sort groups the
// gradient rows of each distinct index in their order, and a warp per distinct row sums them and
// applies the rule, so results do not depend on scheduling. Row-wise Adagrad's mean is a warp
// reduction, so it may differ from the CPU's in the last bit.
#ifndef DISTRIBUTED_EMBEDDINGS_EMBEDDING_KERNELS_SPARSE_UPDATE_CUDA_H_
#define DISTRIBUTED_EMBEDDINGS_EMBEDDING_KERNELS_SPARSE_UPDATE_CUDA_H_

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "embedding/kernels/sparse_update.h"

namespace distributed_embeddings {

template <typename T, typename IdT>
size_t SparseUpdateCudaWorkspaceBytes(int64_t num_indices);

template <typename T, typename IdT>
Status SparseUpdateCuda(SparseRule rule, const SparseHyper<T>& hyper, const SparseTable<T>& table,
                        const IdT* indices, int64_t num_indices, const T* grad, void* workspace,
                        size_t workspace_bytes, cudaStream_t stream);

}  // namespace distributed_embeddings

#endif  // DISTRIBUTED_EMBEDDINGS_EMBEDDING_KERNELS_SPARSE_UPDATE_CUDA_H_
