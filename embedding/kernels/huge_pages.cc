#include "embedding/kernels/huge_pages.h"

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <thread>
#include <unordered_set>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace distributed_embeddings {
namespace {

constexpr uintptr_t kHugePageBytes = uintptr_t{1} << 21;
// Bounds the memory of buffers already handled; forgetting them only repeats a cheap request.
constexpr size_t kMaxRemembered = 4096;
#if defined(__linux__) && !defined(MADV_COLLAPSE)
constexpr int MADV_COLLAPSE = 25;  // Older libc headers lack it; the kernel decides.
#endif

bool Enabled() {
  const char* setting = std::getenv("DE_HUGE_PAGES");
  return setting == nullptr || std::strcmp(setting, "0") != 0;
}

// The whole huge pages inside [data, data + bytes), if the buffer is large enough to bother and
// huge pages are not switched off.
bool WholeHugePages(const void* data, size_t bytes, size_t min_bytes, uintptr_t* begin,
                    uintptr_t* end) {
  if (data == nullptr || bytes < min_bytes) return false;
  static const bool enabled = Enabled();
  if (!enabled) return false;
  *begin = (reinterpret_cast<uintptr_t>(data) + kHugePageBytes - 1) & ~(kHugePageBytes - 1);
  *end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHugePageBytes - 1);
  return *begin < *end;
}

}  // namespace

bool PromoteToHugePages(const void* data, size_t bytes) {
#if defined(__linux__)
  uintptr_t begin = 0, end = 0;
  if (!WholeHugePages(data, bytes, kHugePageMinBytes, &begin, &end)) return false;
  {
    static std::mutex mutex;
    static std::unordered_set<uintptr_t>* seen = new std::unordered_set<uintptr_t>();
    std::lock_guard<std::mutex> lock(mutex);
    if (!seen->insert(begin).second) return false;
    if (seen->size() > kMaxRemembered) seen->clear();
  }
  void* start = reinterpret_cast<void*>(begin);
  const size_t length = end - begin;
  // Failures (THP disabled, an old kernel, memory since unmapped) leave the pages as they were.
  madvise(start, length, MADV_HUGEPAGE);
  std::thread([start, length] { madvise(start, length, MADV_COLLAPSE); }).detach();
  return true;
#else
  (void)data;
  (void)bytes;
  return false;
#endif
}

bool AdviseHugePagesBeforeFirstWrite(void* data, size_t bytes) {
#if defined(__linux__)
  uintptr_t begin = 0, end = 0;
  if (!WholeHugePages(data, bytes, kFreshHugePageMinBytes, &begin, &end)) return false;
  return madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE) == 0;
#else
  (void)data;
  (void)bytes;
  return false;
#endif
}

}  // namespace distributed_embeddings
