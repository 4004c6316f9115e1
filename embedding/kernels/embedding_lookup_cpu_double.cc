// The kernel library's CPU entry points for double tables (templates in
// embedding_lookup_cpu_impl.h).
#include <cstdint>

#include "embedding/kernels/embedding_lookup.h"
#include "embedding/kernels/embedding_lookup_cpu_impl.h"

namespace distributed_embeddings {

DE_INSTANTIATE_CPU_LOOKUP(double, int32_t, int32_t)
DE_INSTANTIATE_CPU_LOOKUP(double, int32_t, int64_t)
DE_INSTANTIATE_CPU_LOOKUP(double, int64_t, int32_t)
DE_INSTANTIATE_CPU_LOOKUP(double, int64_t, int64_t)

}  // namespace distributed_embeddings
