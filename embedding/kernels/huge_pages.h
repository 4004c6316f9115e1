// Transparent huge pages for large, randomly read tables.
//
// A lookup touches a random row per id, so with 4 KiB pages nearly every row costs a TLB miss and
// a page walk on top of the cache miss (BENCHMARKS.md has the cost). NumPy asks for huge pages on
// large arrays (so torch tensors made from them get them); TensorFlow's CPU allocator does not.
#ifndef DISTRIBUTED_EMBEDDINGS_EMBEDDING_KERNELS_HUGE_PAGES_H_
#define DISTRIBUTED_EMBEDDINGS_EMBEDDING_KERNELS_HUGE_PAGES_H_

#include <cstddef>
#include <cstdint>

namespace distributed_embeddings {

// Tables smaller than this are left alone: their pages mostly fit in the TLB already.
constexpr size_t kHugePageMinBytes = size_t{32} << 20;
// Fresh outputs smaller than this are left alone: they hold less than one whole huge page.
constexpr size_t kFreshHugePageMinBytes = size_t{4} << 20;

// The system's transparent huge page mode (/sys/kernel/mm/transparent_hugepage/enabled).
enum class ThpMode { kAlways, kMadvise, kNever };
ThpMode SystemThpMode();

// Asks Linux to back the whole 2 MiB pages inside [data, data + bytes) with huge pages: marks
// them MADV_HUGEPAGE and queues a collapse of the pages already present (MADV_COLLAPSE, Linux
// 6.1+) for one background worker, so the caller never waits. Contents are untouched; concurrent
// reads and writes stay valid. A buffer is promoted the second time it is passed at the same
// address and size, and only then: a buffer that is new on every call costs nothing. Small
// buffers, other systems, and DE_HUGE_PAGES=0 in the environment make it a no-op. Returns true
// if it issued the request. At most 16 collapses wait; more are dropped, and if the worker
// cannot be started none run.
bool PromoteToHugePages(const void* data, size_t bytes);

// Asks for huge pages in a buffer of kFreshHugePageMinBytes or more that has just been allocated
// and is about to be written for the first time, such as an op's output, so that its first
// write faults in 2 MiB at a time instead of 4 KiB (BENCHMARKS.md has the cost of the small
// pages). Only in the "madvise" THP mode: in "always" mode first writes get huge pages anyway.
// Call EndFirstWriteAdvice once the write is done. Small buffers, other systems and
// DE_HUGE_PAGES=0 make it a no-op. Returns true if it asked.
bool AdviseHugePagesBeforeFirstWrite(void* data, size_t bytes);

// Ends the advice of AdviseHugePagesBeforeFirstWrite for the same buffer, so that it does not
// outlive the buffer: a buffer under 32 MiB may sit in glibc's heap, whose memory is reused.
void EndFirstWriteAdvice(void* data, size_t bytes);

// AdviseHugePagesBeforeFirstWrite for its lifetime: construct before the first write, let it go
// when the write is done.
class FirstWriteAdvice {
 public:
  FirstWriteAdvice(void* data, size_t bytes)
      : data_(data), bytes_(bytes), advised_(AdviseHugePagesBeforeFirstWrite(data, bytes)) {}
  ~FirstWriteAdvice() {
    if (advised_) EndFirstWriteAdvice(data_, bytes_);
  }
  FirstWriteAdvice(const FirstWriteAdvice&) = delete;
  FirstWriteAdvice& operator=(const FirstWriteAdvice&) = delete;

 private:
  void* data_;
  size_t bytes_;
  bool advised_;
};

// For tests: collapses queued so far, a way to make the worker's start fail, and a way to forget
// which buffers were seen.
int64_t HugePageCollapsesQueuedForTesting();
void FailHugePageWorkerStartForTesting(bool fail);
void ForgetHugePageSightingsForTesting();

}  // namespace distributed_embeddings

#endif  // DISTRIBUTED_EMBEDDINGS_EMBEDDING_KERNELS_HUGE_PAGES_H_
