// Pooled embedding lookups over CSR ids: the framework-free CUDA API.
//
// Same semantics as embedding_lookup.h, with device pointers, a stream and caller-provided device
// scratch (`workspace`, sized by the matching *WorkspaceBytes function) so that a framework can
// serve it from its own allocator. Validation runs on the device before any table or output memory
// is touched, and its verdict (with the values an error message shows) is copied back in one
// piece: the forward synchronizes `stream` once, the backward twice (the verdict, then the number
// of unique ids that sizes its outputs), and the COO conversion once (plus one more copy on
// error). Errors and their order match the CPU version's. The unique ids of the backward pass
// come out in ascending order (the CPU version keeps first occurrence).
#ifndef DISTRIBUTED_EMBEDDINGS_EMBEDDING_KERNELS_EMBEDDING_LOOKUP_CUDA_H_
#define DISTRIBUTED_EMBEDDINGS_EMBEDDING_KERNELS_EMBEDDING_LOOKUP_CUDA_H_

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "embedding/kernels/embedding_lookup.h"

namespace distributed_embeddings {

// Device scratch for PooledLookupForwardCuda and CooToRowSplitsCuda.
size_t ValidationWorkspaceBytes();

// Device scratch for PooledLookupBackwardCuda.
template <typename T, typename IdT, typename OffsetT>
size_t PooledLookupBackwardCudaWorkspaceBytes(int64_t nnz, int64_t batch);

template <typename T, typename IdT, typename OffsetT>
Status PooledLookupForwardCuda(const T* params, int64_t num_rows, int64_t width,
                               const CsrIds<IdT, OffsetT>& csr, Combiner combiner,
                               BoundsCheck bounds_check, T* output, void* workspace,
                               size_t workspace_bytes, cudaStream_t stream);

// `*num_unique` is written on the host. `unique_ids` and `unique_grad` are device buffers with room
// for MaxUniqueIds(csr.nnz, num_rows) rows.
template <typename T, typename IdT, typename OffsetT>
Status PooledLookupBackwardCuda(const T* grad_output, int64_t num_rows, int64_t width,
                                const CsrIds<IdT, OffsetT>& csr, Combiner combiner,
                                BoundsCheck bounds_check, IdT* unique_ids, T* unique_grad,
                                int64_t* num_unique, void* workspace, size_t workspace_bytes,
                                cudaStream_t stream);

// Weighted bags (embedding_lookup.h): `weights` is a device array of csr.nnz values. The backward
// needs the same workspace as PooledLookupBackwardCuda.
template <typename T, typename IdT, typename OffsetT>
Status WeightedPooledLookupForwardCuda(const T* params, int64_t num_rows, int64_t width,
                                       const CsrIds<IdT, OffsetT>& csr, const T* weights,
                                       Combiner combiner, BoundsCheck bounds_check, T* output,
                                       void* workspace, size_t workspace_bytes,
                                       cudaStream_t stream);

template <typename T, typename IdT, typename OffsetT>
Status WeightedPooledLookupBackwardCuda(const T* grad_output, int64_t num_rows, int64_t width,
                                        const CsrIds<IdT, OffsetT>& csr, const T* weights,
                                        Combiner combiner, BoundsCheck bounds_check,
                                        IdT* unique_ids, T* unique_grad, int64_t* num_unique,
                                        void* workspace, size_t workspace_bytes,
                                        cudaStream_t stream);

// Half-precision tables, as HalfPooledLookupForwardCpu and HalfPooledLookupBackwardCpu
// (embedding_lookup.h): sums in float, rounded once; `weights` null for unweighted bags. The
// backward's workspace is PooledLookupBackwardCudaWorkspaceBytes<T, IdT, OffsetT>.
template <typename T, typename OutT, typename IdT, typename OffsetT>
Status HalfPooledLookupForwardCuda(const T* params, int64_t num_rows, int64_t width,
                                   const CsrIds<IdT, OffsetT>& csr, const OutT* weights,
                                   Combiner combiner, BoundsCheck bounds_check, OutT* output,
                                   void* workspace, size_t workspace_bytes, cudaStream_t stream);

template <typename T, typename GradT, typename IdT, typename OffsetT>
Status HalfPooledLookupBackwardCuda(const GradT* grad_output, int64_t num_rows, int64_t width,
                                    const CsrIds<IdT, OffsetT>& csr, const GradT* weights,
                                    Combiner combiner, BoundsCheck bounds_check, IdT* unique_ids,
                                    T* unique_grad, int64_t* num_unique, void* workspace,
                                    size_t workspace_bytes, cudaStream_t stream);

template <typename OffsetT>
Status CooToRowSplitsCuda(const int64_t* indices, int64_t nnz, int64_t num_rows_dense,
                          int64_t num_cols_dense, OffsetT* row_splits, void* workspace,
                          size_t workspace_bytes, cudaStream_t stream);

// True when a CUDA device is usable; tests use it to skip GPU cases on machines without one.
bool CudaDeviceAvailable();

}  // namespace distributed_embeddings

#endif  // DISTRIBUTED_EMBEDDINGS_EMBEDDING_KERNELS_EMBEDDING_LOOKUP_CUDA_H_
