// CUDA IntegerLookup over a device-resident state; see integer_lookup.h for the layout and
// semantics. The new keys of one call get ids in an unspecified order. Reading the vocabulary size
// back for validation synchronizes `stream` once.
#ifndef DISTRIBUTED_EMBEDDINGS_EMBEDDING_KERNELS_INTEGER_LOOKUP_CUDA_H_
#define DISTRIBUTED_EMBEDDINGS_EMBEDDING_KERNELS_INTEGER_LOOKUP_CUDA_H_

#include <cuda_runtime_api.h>

#include "embedding/kernels/integer_lookup.h"

namespace distributed_embeddings {

template <typename KeyT>
Status IntegerLookupCuda(int64_t* state, int64_t state_size, int64_t max_tokens, const KeyT* keys,
                         int64_t n, bool insert, int64_t* ids, cudaStream_t stream);

}  // namespace distributed_embeddings

#endif  // DISTRIBUTED_EMBEDDINGS_EMBEDDING_KERNELS_INTEGER_LOOKUP_CUDA_H_
