// Transparent huge pages for large, randomly read tables.
//
// A lookup touches a random row per id, so with 4 KiB pages nearly every row costs a TLB miss and
// a page walk on top of the cache miss: measured here, a 256 MB table looked up through 4 KiB
// pages runs 1.5-1.9x slower than through 2 MiB pages. NumPy asks for huge pages on large arrays
// (so torch tensors made from them get them); TensorFlow's CPU allocator does not.
#ifndef DISTRIBUTED_EMBEDDINGS_EMBEDDING_KERNELS_HUGE_PAGES_H_
#define DISTRIBUTED_EMBEDDINGS_EMBEDDING_KERNELS_HUGE_PAGES_H_

#include <cstddef>

namespace distributed_embeddings {

// Tables smaller than this are left alone: their pages mostly fit in the TLB already.
constexpr size_t kHugePageMinBytes = size_t{32} << 20;
// Fresh outputs smaller than this are left alone: they hold less than one whole huge page.
constexpr size_t kFreshHugePageMinBytes = size_t{4} << 20;

// Asks Linux to back the whole 2 MiB pages inside [data, data + bytes) with huge pages: marks
// them MADV_HUGEPAGE and, on a background thread, collapses the pages already present
// (MADV_COLLAPSE, Linux 6.1+), so the caller never waits. Contents are untouched; concurrent
// reads and writes stay valid. Each buffer start is handled once per process; small buffers,
// other systems, and DE_HUGE_PAGES=0 in the environment make it a no-op. Returns true if it
// issued the request.
bool PromoteToHugePages(const void* data, size_t bytes);

// Asks for huge pages in a buffer of kFreshHugePageMinBytes or more that has just been allocated
// and is about to be written for the first time, such as an op's output. Allocations over 32 MiB
// come straight from mmap, and smaller ones often reuse heap memory glibc has trimmed, so the
// first write faults in every page: with 4 KiB pages that was 9,200 faults for a 40 MB gradient
// (a call of 8-9 ms took 21-25 ms), and in about half of the processes 2,000 faults per step for
// a 21 MB one (fwd+bwd 7.5-11 ms instead of 4-5). Marked MADV_HUGEPAGE, it faults in 2 MiB at a time.
// Unlike PromoteToHugePages there is nothing to collapse yet and nothing is remembered. Small
// buffers, other systems and DE_HUGE_PAGES=0 make it a no-op. Returns true if it asked.
bool AdviseHugePagesBeforeFirstWrite(void* data, size_t bytes);

}  // namespace distributed_embeddings

#endif  // DISTRIBUTED_EMBEDDINGS_EMBEDDING_KERNELS_HUGE_PAGES_H_
