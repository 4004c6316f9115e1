// Tests of the CPU IntegerLookup, including concurrent inserts from many threads.
#include "embedding/kernels/integer_lookup.h"

#include <algorithm>
#include <chrono>
#include <map>
#include <random>
#include <thread>
#include <vector>

#include "embedding/kernels/integer_lookup_test_util.h"
#include "embedding/kernels/lookup_test_util.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace distributed_embeddings {
namespace {

using ::distributed_embeddings::testing::ExpectConsistentIds;
using ::distributed_embeddings::testing::ThreadedParallelFor;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

std::vector<int64_t> NewState(int64_t max_tokens) {
  std::vector<int64_t> state(IntegerLookupStateSize(max_tokens));
  InitIntegerLookupState(state.data(), max_tokens);
  return state;
}

template <typename KeyT>
std::vector<int64_t> Lookup(std::vector<int64_t>& state, int64_t max_tokens,
                            const std::vector<KeyT>& keys, bool insert = true,
                            const ParallelFor& pf = ParallelFor()) {
  std::vector<int64_t> ids(keys.size(), -99);
  const Status status =
      IntegerLookupCpu(state.data(), static_cast<int64_t>(state.size()), max_tokens, keys.data(),
                       static_cast<int64_t>(keys.size()), insert, ids.data(), pf);
  EXPECT_TRUE(status.ok()) << status.message();
  return ids;
}

TEST(IntegerLookupCpuTest, AssignsContiguousIdsInOrderOfFirstOccurrence) {
  auto state = NewState(10);
  EXPECT_THAT(Lookup<int64_t>(state, 10, {50, 7, 50, -3, 7, int64_t{1} << 40}),
              ElementsAre(1, 2, 1, 3, 2, 4));
  EXPECT_THAT(Lookup<int64_t>(state, 10, {7, 9, 50}), ElementsAre(2, 5, 1));
  EXPECT_EQ(state[0], 5);
}

TEST(IntegerLookupCpuTest, Int32KeysShareTheTableWithInt64Keys) {
  auto state = NewState(4);
  EXPECT_THAT(Lookup<int32_t>(state, 4, {3, 4}), ElementsAre(1, 2));
  EXPECT_THAT(Lookup<int64_t>(state, 4, {4, 3}), ElementsAre(2, 1));
}

TEST(IntegerLookupCpuTest, OovTokenAndFullVocabularyMapToZero) {
  auto state = NewState(3);
  EXPECT_THAT(Lookup<int64_t>(state, 3, {10, -1, 20, 30, 40, 10}), ElementsAre(1, 0, 2, 3, 0, 1));
  EXPECT_THAT(Lookup<int64_t>(state, 3, {40, 50, 30}), ElementsAre(0, 0, 3));
  EXPECT_EQ(state[0], 3);
}

TEST(IntegerLookupCpuTest, LookupWithoutInsertLeavesTheVocabularyAlone) {
  auto state = NewState(8);
  Lookup<int64_t>(state, 8, {5, 6});
  EXPECT_THAT(Lookup<int64_t>(state, 8, {6, 99, 5}, /*insert=*/false), ElementsAre(2, 0, 1));
  EXPECT_EQ(state[0], 2);
}

TEST(IntegerLookupCpuTest, MatchesAMapOnARandomStream) {
  constexpr int64_t kMaxTokens = 500;
  auto state = NewState(kMaxTokens);
  std::map<int64_t, int64_t> reference;
  std::mt19937_64 rng(11);
  for (int batch = 0; batch < 20; ++batch) {
    std::vector<int64_t> keys(300);
    for (auto& k : keys) k = static_cast<int64_t>(rng() % 2000) - 1000;
    const auto ids = Lookup(state, kMaxTokens, keys, true, ThreadedParallelFor(4));
    for (size_t i = 0; i < keys.size(); ++i) {
      int64_t expected = 0;
      if (keys[i] != -1) {
        auto it = reference.find(keys[i]);
        if (it != reference.end()) {
          expected = it->second;
        } else if (static_cast<int64_t>(reference.size()) < kMaxTokens) {
          expected = reference.size() + 1;
          reference[keys[i]] = expected;
        }
      }
      ASSERT_EQ(expected, ids[i]) << "key " << keys[i];
    }
  }
}

// Many threads insert overlapping, differently ordered key sets into one table at once.
void RunConcurrentInserts(int64_t max_tokens, int64_t distinct_keys) {
  auto state = NewState(max_tokens);
  constexpr int kThreads = 8;
  std::vector<std::vector<int64_t>> keys(kThreads), ids(kThreads);
  for (int t = 0; t < kThreads; ++t) {
    for (int64_t k = 0; k < distinct_keys; ++k) keys[t].push_back(k * 7919 + 3);
    std::shuffle(keys[t].begin(), keys[t].end(), std::mt19937(t));
    ids[t].resize(keys[t].size());
  }
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      ASSERT_TRUE(IntegerLookupCpu(state.data(), static_cast<int64_t>(state.size()), max_tokens,
                                   keys[t].data(), distinct_keys, true, ids[t].data(),
                                   ThreadedParallelFor(2))
                      .ok());
    });
  }
  for (auto& t : threads) t.join();
  const auto id_of = ExpectConsistentIds(keys, ids, state[0], max_tokens);
  EXPECT_EQ(state[0], std::min(max_tokens, distinct_keys));
}

TEST(IntegerLookupCpuTest, ConcurrentInsertsOfTheSameKeysGiveOneIdEach) {
  RunConcurrentInserts(/*max_tokens=*/5000, /*distinct_keys=*/3000);
}

TEST(IntegerLookupCpuTest, ConcurrentInsertsStopAtMaxTokens) {
  RunConcurrentInserts(/*max_tokens=*/100, /*distinct_keys=*/3000);
}

TEST(IntegerLookupCpuTest, RejectsStateOfAnotherSize) {
  auto state = NewState(10);
  std::vector<int64_t> ids(1);
  const int64_t key = 1;
  const Status status = IntegerLookupCpu(state.data(), static_cast<int64_t>(state.size()), 100,
                                         &key, 1, true, ids.data());
  EXPECT_EQ(status.code(), Status::Code::kInvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("possibly a checkpoint of a layer of another size"));
}

TEST(IntegerLookupCpuTest, RejectsCorruptVocabularySize) {
  auto state = NewState(10);
  state[0] = 11;
  std::vector<int64_t> ids(1);
  const int64_t key = 1;
  const Status status = IntegerLookupCpu(state.data(), static_cast<int64_t>(state.size()), 10, &key,
                                         1, true, ids.data());
  EXPECT_THAT(status.message(), HasSubstr("vocabulary size outside [0, 10]; got 11."));
}

TEST(IntegerLookupCpuTest, FullCorruptTableEndsWithOov) {
  // A table whose every slot holds another key must not make a lookup probe forever.
  auto state = NewState(4);
  for (size_t s = 1; s < state.size(); s += 2) {
    state[s] = 1000 + static_cast<int64_t>(s);
    state[s + 1] = 1;
  }
  EXPECT_THAT(Lookup<int64_t>(state, 4, {5}), ElementsAre(0));
}

TEST(IntegerLookupCpuTest, KeyWithoutIdIsAnErrorAfterABoundedWait) {
  // A slot holding a key whose id is pending forever (no insert is running): a damaged state.
  auto state = NewState(4);
  std::vector<int64_t> ids(1);
  const int64_t key = 5;
  ASSERT_TRUE(IntegerLookupCpu(state.data(), static_cast<int64_t>(state.size()), 4, &key, 1, true,
                               ids.data())
                  .ok());
  for (size_t s = 1; s < state.size(); s += 2) {
    if (state[s] == key) state[s + 1] = kPendingId;
  }
  const auto start = std::chrono::steady_clock::now();
  const Status status = IntegerLookupCpu(state.data(), static_cast<int64_t>(state.size()), 4, &key,
                                         1, false, ids.data());
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(30));
  EXPECT_EQ(status.code(), Status::Code::kInvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("key 5 is in the vocabulary without a valid id"));
  EXPECT_EQ(ids[0], kOovId);
  EXPECT_THAT(
      ValidateIntegerLookupState(state.data(), static_cast<int64_t>(state.size()), 4).message(),
      HasSubstr("holds key 5 with id -1"));
}

TEST(IntegerLookupCpuTest, IdAboveMaxTokensIsAnError) {
  auto state = NewState(4);
  const int64_t key = 9;
  std::vector<int64_t> ids(1);
  ASSERT_TRUE(IntegerLookupCpu(state.data(), static_cast<int64_t>(state.size()), 4, &key, 1, true,
                               ids.data())
                  .ok());
  for (size_t s = 1; s < state.size(); s += 2) {
    if (state[s] == key) state[s + 1] = 5;
  }
  EXPECT_EQ(IntegerLookupCpu(state.data(), static_cast<int64_t>(state.size()), 4, &key, 1, true,
                             ids.data())
                .code(),
            Status::Code::kInvalidArgument);
}

TEST(IntegerLookupCpuTest, ValidateStateAcceptsTrainedStatesAndRejectsDamage) {
  auto state = NewState(8);
  const std::vector<int64_t> keys = {3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7};
  std::vector<int64_t> ids(keys.size());
  ASSERT_TRUE(IntegerLookupCpu(state.data(), static_cast<int64_t>(state.size()), 8, keys.data(),
                               static_cast<int64_t>(keys.size()), true, ids.data())
                  .ok());
  const int64_t size = static_cast<int64_t>(state.size());
  EXPECT_TRUE(ValidateIntegerLookupState(state.data(), size, 8).ok());
  EXPECT_THAT(ValidateIntegerLookupState(state.data(), size, 100).message(),
              HasSubstr("another size"));
  EXPECT_THAT(ValidateIntegerLookupState(state.data(), size, kMaxIntegerLookupTokens + 1).message(),
              HasSubstr("'max_tokens' must be in [1, 1099511627776]"));
  auto damaged = state;
  damaged[0] = -1;
  EXPECT_THAT(ValidateIntegerLookupState(damaged.data(), size, 8).message(),
              HasSubstr("vocabulary size outside [0, 8]; got -1"));
  damaged = state;
  for (size_t s = 1; s < damaged.size(); s += 2) {
    if (damaged[s] == 4) damaged[s] = kOovKey;
  }
  EXPECT_THAT(ValidateIntegerLookupState(damaged.data(), size, 8).message(),
              HasSubstr("holds key -1"));
}

}  // namespace
}  // namespace distributed_embeddings
