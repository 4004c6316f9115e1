#include "embedding/kernels/huge_pages.h"

#include <dirent.h>
#include <sys/mman.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"

namespace distributed_embeddings {
namespace {

// An anonymous mapping of `bytes`, untouched (so it costs no memory), unmapped with the object.
class Mapping {
 public:
  explicit Mapping(size_t bytes) : bytes_(bytes) {
    data_ = mmap(nullptr, bytes, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    EXPECT_NE(data_, MAP_FAILED);
  }
  ~Mapping() { munmap(data_, bytes_); }
  char* data() const { return static_cast<char*>(data_); }
  size_t size() const { return bytes_; }

 private:
  void* data_;
  size_t bytes_;
};

int ThreadCount() {
  int count = 0;
  if (DIR* tasks = opendir("/proc/self/task")) {
    while (dirent* entry = readdir(tasks)) count += entry->d_name[0] != '.';
    closedir(tasks);
  }
  return count;
}

// The VmFlags line of the smaps entry that contains `address` ("" if none).
std::string VmFlagsAt(const void* address) {
  std::ifstream smaps("/proc/self/smaps");
  const auto target = reinterpret_cast<uintptr_t>(address);
  bool inside = false;
  for (std::string line; std::getline(smaps, line);) {
    unsigned long begin = 0, end = 0;
    if (std::sscanf(line.c_str(), "%lx-%lx ", &begin, &end) == 2 && line.find('-') < 17) {
      inside = begin <= target && target < end;
    } else if (inside && line.rfind("VmFlags:", 0) == 0) {
      return line + " ";
    }
  }
  return "";
}

TEST(HugePagesTest, ContentsSurviveAndReadersKeepReading) {
  const size_t count = (kHugePageMinBytes * 2 + 12345) / sizeof(uint32_t);
  std::vector<uint32_t> table(count);
  for (size_t i = 0; i < count; ++i) table[i] = static_cast<uint32_t>(i * 2654435761u);
  ForgetHugePageSightingsForTesting();
  // An unaligned start: only the whole huge pages inside are promoted, on the second sighting,
  // and only once.
  EXPECT_FALSE(PromoteToHugePages(table.data() + 3, (count - 3) * sizeof(uint32_t)));
  EXPECT_TRUE(PromoteToHugePages(table.data() + 3, (count - 3) * sizeof(uint32_t)));
  EXPECT_FALSE(PromoteToHugePages(table.data() + 3, (count - 3) * sizeof(uint32_t)));
  // Read and write while the background collapse may be running, then check everything.
  for (int pass = 0; pass < 3; ++pass) {
    for (size_t i = 0; i < count; i += 997) table[i] += 1;
    for (size_t i = 0; i < count; i += 997) table[i] -= 1;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  for (size_t i = 0; i < count; ++i) {
    ASSERT_EQ(static_cast<uint32_t>(i * 2654435761u), table[i]) << "at " << i;
  }
}

TEST(HugePagesTest, SmallOrNullBuffersAreLeftAlone) {
  std::vector<char> small(kHugePageMinBytes - 1);
  EXPECT_FALSE(PromoteToHugePages(small.data(), small.size()));
  EXPECT_FALSE(PromoteToHugePages(small.data(), small.size()));
  EXPECT_FALSE(PromoteToHugePages(nullptr, kHugePageMinBytes * 4));
}

TEST(HugePagesTest, ABufferNewOnEveryCallIsNeverCollapsed) {
  // A table cast afresh on every step: each buffer is seen once, so nothing is queued.
  // (All kept alive, so each has its own address, as TF's allocator gives a live buffer.)
  ForgetHugePageSightingsForTesting();
  const int64_t queued = HugePageCollapsesQueuedForTesting();
  std::vector<std::unique_ptr<Mapping>> steps;
  for (int step = 0; step < 20; ++step) {
    steps.push_back(std::make_unique<Mapping>(kHugePageMinBytes * 2));
    EXPECT_FALSE(PromoteToHugePages(steps.back()->data(), steps.back()->size()));
  }
  EXPECT_EQ(queued, HugePageCollapsesQueuedForTesting());
}

TEST(HugePagesTest, ManyTablesShareOneBoundedWorker) {
  ForgetHugePageSightingsForTesting();
  std::vector<std::unique_ptr<Mapping>> tables;
  for (int t = 0; t < 64; ++t) tables.push_back(std::make_unique<Mapping>(kHugePageMinBytes * 2));
  const int threads_before = ThreadCount();
  const int64_t queued_before = HugePageCollapsesQueuedForTesting();
  for (int round = 0; round < 2; ++round) {
    for (const auto& table : tables) PromoteToHugePages(table->data(), table->size());
  }
  // At most the one worker thread is new, and the queue never held more than its bound.
  EXPECT_LE(ThreadCount(), threads_before + 1);
  const int64_t queued = HugePageCollapsesQueuedForTesting() - queued_before;
  EXPECT_GT(queued, 0);
  EXPECT_LE(queued, 64);
  std::this_thread::sleep_for(std::chrono::milliseconds(200));  // let it drain before unmapping
}

TEST(HugePagesTest, AWorkerThatCannotStartIsNotFatal) {
  ForgetHugePageSightingsForTesting();
  Mapping table(kHugePageMinBytes * 2);
  FailHugePageWorkerStartForTesting(true);
  const int64_t queued = HugePageCollapsesQueuedForTesting();
  EXPECT_FALSE(PromoteToHugePages(table.data(), table.size()));
  EXPECT_TRUE(PromoteToHugePages(table.data(), table.size()));  // advised; the collapse dropped
  EXPECT_EQ(queued, HugePageCollapsesQueuedForTesting());
  FailHugePageWorkerStartForTesting(false);
}

TEST(HugePagesTest, FirstWriteAdviceEndsWithTheWrite) {
  // Uninitialized, so its pages are first touched after the advice, as an op's output is.
  const size_t count = (kFreshHugePageMinBytes * 2 + 4321) / sizeof(uint64_t);
  std::unique_ptr<uint64_t[]> buffer(new uint64_t[count]);
  const uintptr_t inner =
      (reinterpret_cast<uintptr_t>(buffer.get()) + (2 << 20) - 1) & ~uintptr_t{(2 << 20) - 1};
  {
    const FirstWriteAdvice advice(buffer.get() + 1, (count - 1) * sizeof(uint64_t));
    if (SystemThpMode() == ThpMode::kMadvise) {
      EXPECT_NE(VmFlagsAt(reinterpret_cast<void*>(inner)).find(" hg "), std::string::npos);
    }
    for (size_t i = 0; i < count; ++i) buffer[i] = i * 0x9E3779B97F4A7C15ull;
  }
  for (size_t i = 0; i < count; ++i) {
    ASSERT_EQ(i * 0x9E3779B97F4A7C15ull, buffer[i]) << "at " << i;
  }
  // No huge-page advice outlives the write: later memory at this address gets the default.
  EXPECT_EQ(VmFlagsAt(reinterpret_cast<void*>(inner)).find(" hg "), std::string::npos);
  if (SystemThpMode() != ThpMode::kMadvise) {
    EXPECT_FALSE(AdviseHugePagesBeforeFirstWrite(buffer.get(), count * sizeof(uint64_t)));
  }
  std::vector<char> small(kFreshHugePageMinBytes - 1);
  EXPECT_FALSE(AdviseHugePagesBeforeFirstWrite(small.data(), small.size()));
  EXPECT_FALSE(AdviseHugePagesBeforeFirstWrite(nullptr, kHugePageMinBytes * 4));
}

}  // namespace
}  // namespace distributed_embeddings
