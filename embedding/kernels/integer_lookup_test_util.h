// Checks shared by the CPU and CUDA IntegerLookup suites.
#ifndef DISTRIBUTED_EMBEDDINGS_EMBEDDING_KERNELS_INTEGER_LOOKUP_TEST_UTIL_H_
#define DISTRIBUTED_EMBEDDINGS_EMBEDDING_KERNELS_INTEGER_LOOKUP_TEST_UTIL_H_

#include <cstdint>
#include <map>
#include <set>
#include <vector>

#include "embedding/kernels/integer_lookup.h"
#include "gtest/gtest.h"

namespace distributed_embeddings {
namespace testing {

// Every key got one id in every call, distinct keys got distinct ids, the ids in use are exactly
// 1..count, and no more than max_tokens keys have ids. Returns the key -> id map.
inline std::map<int64_t, int64_t> ExpectConsistentIds(const std::vector<std::vector<int64_t>>& keys,
                                                      const std::vector<std::vector<int64_t>>& ids,
                                                      int64_t count, int64_t max_tokens) {
  std::map<int64_t, int64_t> id_of;
  std::map<int64_t, int64_t> key_of;
  for (size_t c = 0; c < keys.size(); ++c) {
    for (size_t i = 0; i < keys[c].size(); ++i) {
      const int64_t key = keys[c][i], id = ids[c][i];
      auto [it, inserted] = id_of.emplace(key, id);
      EXPECT_EQ(it->second, id) << "key " << key << " got two ids";
      if (id == kOovId) continue;
      auto [kt, fresh] = key_of.emplace(id, key);
      EXPECT_EQ(kt->second, key) << "id " << id << " given to two keys";
    }
  }
  EXPECT_LE(count, max_tokens);
  EXPECT_EQ(static_cast<int64_t>(key_of.size()), count);
  if (!key_of.empty()) {
    EXPECT_EQ(key_of.begin()->first, 1);
    EXPECT_EQ(key_of.rbegin()->first, count);
  }
  return id_of;
}

}  // namespace testing
}  // namespace distributed_embeddings

#endif  // DISTRIBUTED_EMBEDDINGS_EMBEDDING_KERNELS_INTEGER_LOOKUP_TEST_UTIL_H_
