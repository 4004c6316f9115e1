// The kernel library's CPU entry points for float tables, and everything type-independent: the
// templates are in embedding_lookup_cpu_impl.h, the double instantiations in
// embedding_lookup_cpu_double.cc.
#include <atomic>
#include <cstdint>

#include "embedding/kernels/embedding_lookup.h"
#include "embedding/kernels/embedding_lookup_cpu_impl.h"

namespace distributed_embeddings {
namespace cpu_internal {

std::atomic<bool> force_portable_loops{false};

}  // namespace cpu_internal

void ForcePortableCpuLoopsForTesting(bool portable) {
  cpu_internal::force_portable_loops.store(portable);
}

template Status ValidateCsrIds(const CsrIds<int32_t, int32_t>&, int64_t, BoundsCheck);
template Status ValidateCsrIds(const CsrIds<int32_t, int64_t>&, int64_t, BoundsCheck);
template Status ValidateCsrIds(const CsrIds<int64_t, int32_t>&, int64_t, BoundsCheck);
template Status ValidateCsrIds(const CsrIds<int64_t, int64_t>&, int64_t, BoundsCheck);
template Status CooToRowSplitsCpu(const int64_t*, int64_t, int64_t, int64_t, int32_t*);
template Status CooToRowSplitsCpu(const int64_t*, int64_t, int64_t, int64_t, int64_t*);

DE_INSTANTIATE_CPU_LOOKUP(float, int32_t, int32_t)
DE_INSTANTIATE_CPU_LOOKUP(float, int32_t, int64_t)
DE_INSTANTIATE_CPU_LOOKUP(float, int64_t, int32_t)
DE_INSTANTIATE_CPU_LOOKUP(float, int64_t, int64_t)

}  // namespace distributed_embeddings
