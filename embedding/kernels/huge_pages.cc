#include "embedding/kernels/huge_pages.h"

#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>
#include <system_error>
#include <thread>
#include <unordered_map>
#include <utility>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace distributed_embeddings {
namespace {

constexpr uintptr_t kHugePageBytes = uintptr_t{1} << 21;
// Bounds the memory of buffers already seen; forgetting them only repeats a cheap request.
constexpr size_t kMaxRemembered = 4096;
// Collapses waiting for the worker; more are dropped (a collapse is only an optimization).
constexpr size_t kMaxQueuedCollapses = 16;

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

// One background thread runs every MADV_COLLAPSE, from a bounded queue. Never destroyed: it
// may still be collapsing when static destructors run.
class CollapseWorker {
 public:
  // Queues a collapse of [start, start + length); false if it was dropped.
  bool Enqueue(void* start, size_t length) {
    std::lock_guard<std::mutex> lock(mutex_);
    if ((!started_ || fail_start_) && !Start()) return false;
    if (queue_.size() >= kMaxQueuedCollapses) return false;
    queue_.emplace_back(start, length);
    ++queued_;
    ready_.notify_one();
    return true;
  }

  int64_t queued() {
    std::lock_guard<std::mutex> lock(mutex_);
    return queued_;
  }

  void FailStartForTesting(bool fail) {
    std::lock_guard<std::mutex> lock(mutex_);
    fail_start_ = fail;
  }

 private:
  // With mutex_ held. A thread that cannot be created (std::system_error) leaves collapses off
  // rather than ending the process; the next request tries again.
  bool Start() {
    try {
      if (fail_start_) {
        throw std::system_error(std::make_error_code(std::errc::resource_unavailable_try_again));
      }
      std::thread([this] { Run(); }).detach();
    } catch (const std::system_error&) {
      return false;
    }
    started_ = true;
    return true;
  }

  void Run() {
    while (true) {
      std::pair<void*, size_t> job;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        ready_.wait(lock, [this] { return !queue_.empty(); });
        job = queue_.front();
        queue_.pop_front();
      }
#if defined(__linux__)
      // Failures (THP off, an old kernel, memory since unmapped) leave the pages as they were.
      madvise(job.first, job.second, MADV_COLLAPSE);
#endif
    }
  }

  std::mutex mutex_;
  std::condition_variable ready_;
  std::deque<std::pair<void*, size_t>> queue_;
  bool started_ = false;
  bool fail_start_ = false;
  int64_t queued_ = 0;
};

CollapseWorker& Worker() {
  static CollapseWorker* worker = new CollapseWorker();
  return *worker;
}

// Buffers passed to PromoteToHugePages: first huge page -> (length, times seen).
class Sightings {
 public:
  // Counts one more sighting of [begin, begin + length); returns the count.
  int See(uintptr_t begin, size_t length) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (seen_.size() >= kMaxRemembered) seen_.clear();
    auto& entry = seen_[begin];
    if (entry.first != length) entry = {length, 0};
    return ++entry.second;
  }
  void Clear() {
    std::lock_guard<std::mutex> lock(mutex_);
    seen_.clear();
  }

 private:
  std::mutex mutex_;
  std::unordered_map<uintptr_t, std::pair<size_t, int>> seen_;
};

Sightings& TableSightings() {
  static Sightings* sightings = new Sightings();
  return *sightings;
}

}  // namespace

bool PromoteToHugePages(const void* data, size_t bytes) {
#if defined(__linux__)
  uintptr_t begin = 0, end = 0;
  if (!WholeHugePages(data, bytes, kHugePageMinBytes, &begin, &end)) return false;
  // A table is promoted the second time it is read at the same address and size: a buffer that
  // is new on every step (a per-step cast of the table) is seen once and left alone.
  if (TableSightings().See(begin, end - begin) != 2) return false;
  void* start = reinterpret_cast<void*>(begin);
  const size_t length = end - begin;
  madvise(start, length, MADV_HUGEPAGE);
  Worker().Enqueue(start, length);
  return true;
#else
  (void)data;
  (void)bytes;
  return false;
#endif
}

ThpMode SystemThpMode() {
  static const ThpMode mode = [] {
    FILE* file = std::fopen("/sys/kernel/mm/transparent_hugepage/enabled", "r");
    if (file == nullptr) return ThpMode::kNever;
    char text[128] = {0};
    const size_t read = std::fread(text, 1, sizeof(text) - 1, file);
    std::fclose(file);
    text[read] = '\0';
    if (std::strstr(text, "[always]") != nullptr) return ThpMode::kAlways;
    if (std::strstr(text, "[madvise]") != nullptr) return ThpMode::kMadvise;
    return ThpMode::kNever;
  }();
  return mode;
}

bool AdviseHugePagesBeforeFirstWrite(void* data, size_t bytes) {
#if defined(__linux__)
  // In "always" mode first writes fault in huge pages already; in "never" mode advice is moot.
  if (SystemThpMode() != ThpMode::kMadvise) return false;
  uintptr_t begin = 0, end = 0;
  if (!WholeHugePages(data, bytes, kFreshHugePageMinBytes, &begin, &end)) return false;
  return madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE) == 0;
#else
  (void)data;
  (void)bytes;
  return false;
#endif
}

void EndFirstWriteAdvice(void* data, size_t bytes) {
#if defined(__linux__)
  if (SystemThpMode() != ThpMode::kMadvise) return;
  uintptr_t begin = 0, end = 0;
  if (!WholeHugePages(data, bytes, kFreshHugePageMinBytes, &begin, &end)) return;
  // In "madvise" mode MADV_NOHUGEPAGE behaves as no advice at all: later faults in this range
  // (heap memory reused once the buffer is freed) get small pages, as elsewhere. The huge pages
  // the first write faulted in stay.
  madvise(reinterpret_cast<void*>(begin), end - begin, MADV_NOHUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
}

int64_t HugePageCollapsesQueuedForTesting() { return Worker().queued(); }

void FailHugePageWorkerStartForTesting(bool fail) { Worker().FailStartForTesting(fail); }

void ForgetHugePageSightingsForTesting() { TableSightings().Clear(); }

}  // namespace distributed_embeddings
