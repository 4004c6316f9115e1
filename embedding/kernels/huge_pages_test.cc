#include "embedding/kernels/huge_pages.h"

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <thread>
#include <vector>

#include "gtest/gtest.h"

namespace distributed_embeddings {
namespace {

TEST(HugePagesTest, ContentsSurviveAndReadersKeepReading) {
  const size_t count = (kHugePageMinBytes * 2 + 12345) / sizeof(uint32_t);
  std::vector<uint32_t> table(count);
  for (size_t i = 0; i < count; ++i) table[i] = static_cast<uint32_t>(i * 2654435761u);
  // An unaligned start: only the whole huge pages inside are promoted.
  EXPECT_TRUE(PromoteToHugePages(table.data() + 3, (count - 3) * sizeof(uint32_t)));
  // The same buffer again is not requested twice.
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
  EXPECT_FALSE(PromoteToHugePages(nullptr, kHugePageMinBytes * 4));
}

TEST(HugePagesTest, FreshBufferAdvisedBeforeItsFirstWrite) {
  // Uninitialized, so its pages are first touched after the advice, as an op's output is. Its
  // size is below the tables' threshold: a gradient of this size came from the heap and
  // faulted in 4 KiB at a time whenever glibc had trimmed that memory.
  static_assert(kFreshHugePageMinBytes * 2 < kHugePageMinBytes, "the test's buffer size");
  const size_t count = (kFreshHugePageMinBytes * 2 + 4321) / sizeof(uint64_t);
  std::unique_ptr<uint64_t[]> buffer(new uint64_t[count]);
  EXPECT_TRUE(AdviseHugePagesBeforeFirstWrite(buffer.get() + 1, (count - 1) * sizeof(uint64_t)));
  for (size_t i = 0; i < count; ++i) buffer[i] = i * 0x9E3779B97F4A7C15ull;
  for (size_t i = 0; i < count; ++i) {
    ASSERT_EQ(i * 0x9E3779B97F4A7C15ull, buffer[i]) << "at " << i;
  }
  EXPECT_FALSE(PromoteToHugePages(buffer.get(), count * sizeof(uint64_t)));
  std::vector<char> small(kFreshHugePageMinBytes - 1);
  EXPECT_FALSE(AdviseHugePagesBeforeFirstWrite(small.data(), small.size()));
  EXPECT_FALSE(AdviseHugePagesBeforeFirstWrite(nullptr, kHugePageMinBytes * 4));
}

}  // namespace
}  // namespace distributed_embeddings
