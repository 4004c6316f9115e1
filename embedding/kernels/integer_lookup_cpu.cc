// CPU IntegerLookup. A call first looks every key up in parallel (read-only, lock-free), then
// inserts the misses serially in order of first occurrence, so ids do not depend on scheduling.
// Inserts still use atomics: another call may be inserting into the same table at the same time.
#include <algorithm>
#include <chrono>
#include <string>
#include <thread>
#include <vector>

#include "embedding/kernels/integer_lookup.h"
#include "embedding/kernels/integer_lookup_hash.h"

namespace distributed_embeddings {
namespace {

constexpr int64_t kMiss = -2;
// A slot whose key has no valid id: a hand-built or damaged state (a concurrent insert writes
// the id right after claiming the slot, so a live one is pending for nanoseconds).
constexpr int64_t kCorrupt = -3;
// How long a lookup waits for a pending id before calling the state corrupted.
constexpr auto kPendingWait = std::chrono::seconds(2);

int64_t Load(const int64_t* p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }

// The id stored for slot `slot`, waiting out a concurrent insert that has claimed the slot but not
// yet written the id; kCorrupt if it never comes or is outside [0, max_tokens].
int64_t WaitForId(const int64_t* table, int64_t slot, int64_t max_tokens) {
  int64_t id = Load(&table[2 * slot + 1]);
  if (id == kPendingId) {
    const auto deadline = std::chrono::steady_clock::now() + kPendingWait;
    for (int64_t spins = 1; (id = Load(&table[2 * slot + 1])) == kPendingId; ++spins) {
      if (spins % 1024 == 0) {
        if (std::chrono::steady_clock::now() > deadline) return kCorrupt;
        std::this_thread::yield();
      }
    }
  }
  return id >= kOovId && id <= max_tokens ? id : kCorrupt;
}

// Reserves the next id, or returns kOovId once max_tokens ids are out.
int64_t ReserveId(int64_t* count, int64_t max_tokens) {
  int64_t current = Load(count);
  while (current < max_tokens) {
    if (__atomic_compare_exchange_n(count, &current, current + 1, /*weak=*/false, __ATOMIC_ACQ_REL,
                                    __ATOMIC_ACQUIRE)) {
      return current + 1;
    }
  }
  return kOovId;
}

// Finds `key` (and inserts it when `insert`); probing is bounded so a corrupted, full table ends.
int64_t FindOrInsert(int64_t* state, int64_t slots, int64_t max_tokens, int64_t key, bool insert) {
  if (key == kOovKey || key == kEmptyKey) return kOovId;
  int64_t* count = state;
  int64_t* table = state + 1;
  const uint64_t mask = static_cast<uint64_t>(slots - 1);
  uint64_t slot = IntegerLookupHomeSlot(key, mask);
  for (int64_t probe = 0; probe < slots; ++probe, slot = (slot + 1) & mask) {
    int64_t current = Load(&table[2 * slot]);
    if (current == key) return WaitForId(table, slot, max_tokens);
    if (current != kEmptyKey) continue;
    if (!insert) return kMiss;
    // Once the vocabulary is full, unseen keys are OOV and take no slot.
    if (Load(count) >= max_tokens) return kOovId;
    if (__atomic_compare_exchange_n(&table[2 * slot], &current, key, /*weak=*/false,
                                    __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
      const int64_t id = ReserveId(count, max_tokens);
      __atomic_store_n(&table[2 * slot + 1], id, __ATOMIC_RELEASE);
      return id;
    }
    if (current == key) return WaitForId(table, slot, max_tokens);  // Inserted by another thread.
  }
  return insert ? kOovId : kMiss;
}

}  // namespace

int64_t IntegerLookupSlots(int64_t max_tokens) {
  int64_t slots = 16;
  while (slots < 2 * std::min(max_tokens, kMaxIntegerLookupTokens)) slots *= 2;
  return slots;
}

void InitIntegerLookupState(int64_t* state, int64_t max_tokens) {
  const int64_t slots = IntegerLookupSlots(max_tokens);
  state[0] = 0;
  for (int64_t s = 0; s < slots; ++s) {
    state[1 + 2 * s] = kEmptyKey;
    state[2 + 2 * s] = kPendingId;
  }
}

Status ValidateIntegerLookupStateSize(int64_t state_size, int64_t max_tokens) {
  if (max_tokens < 1 || max_tokens > kMaxIntegerLookupTokens) {
    return Status::InvalidArgument("'max_tokens' must be in [1, " +
                                   std::to_string(kMaxIntegerLookupTokens) + "]; got " +
                                   std::to_string(max_tokens) + ".");
  }
  if (state_size != IntegerLookupStateSize(max_tokens)) {
    return Status::InvalidArgument(
        "'state' must have " + std::to_string(IntegerLookupStateSize(max_tokens)) +
        " elements for max_tokens = " + std::to_string(max_tokens) + "; got " +
        std::to_string(state_size) + " (possibly a checkpoint of a layer of another size).");
  }
  return Status::Ok();
}

Status ValidateIntegerLookupCount(int64_t count, int64_t max_tokens) {
  if (count < 0 || count > max_tokens) {
    return Status::InvalidArgument("'state' holds a vocabulary size outside [0, " +
                                   std::to_string(max_tokens) + "]; got " + std::to_string(count) +
                                   ".");
  }
  return Status::Ok();
}

Status ValidateIntegerLookupState(const int64_t* state, int64_t state_size, int64_t max_tokens) {
  DE_RETURN_IF_ERROR(ValidateIntegerLookupStateSize(state_size, max_tokens));
  const int64_t count = state[0];
  DE_RETURN_IF_ERROR(ValidateIntegerLookupCount(count, max_tokens));
  const int64_t slots = (state_size - 1) / 2;
  for (int64_t s = 0; s < slots; ++s) {
    const int64_t key = state[1 + 2 * s];
    const int64_t id = state[2 + 2 * s];
    if (key == kEmptyKey) continue;
    if (key == kOovKey || id < kOovId || id > count) {
      return Status::InvalidArgument(
          "'state' is corrupted: slot " + std::to_string(s) + " holds key " + std::to_string(key) +
          " with id " + std::to_string(id) + "; keys other than " + std::to_string(kOovKey) +
          " have ids in [0, " + std::to_string(count) + "] (the vocabulary size).");
    }
  }
  return Status::Ok();
}

template <typename KeyT>
Status IntegerLookupCpu(int64_t* state, int64_t state_size, int64_t max_tokens, const KeyT* keys,
                        int64_t n, bool insert, int64_t* ids, const ParallelFor& parallel_for) {
  DE_RETURN_IF_ERROR(ValidateIntegerLookupStateSize(state_size, max_tokens));
  DE_RETURN_IF_ERROR(ValidateIntegerLookupCount(Load(state), max_tokens));
  const int64_t slots = (state_size - 1) / 2;
  RunParallel(parallel_for, n, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      ids[i] = FindOrInsert(state, slots, max_tokens, static_cast<int64_t>(keys[i]), false);
    }
  });
  for (int64_t i = 0; i < n; ++i) {
    if (ids[i] == kMiss) {
      ids[i] = insert ? FindOrInsert(state, slots, max_tokens, static_cast<int64_t>(keys[i]), true)
                      : kOovId;
    }
    if (ids[i] == kCorrupt) {
      std::fill(ids, ids + n, kOovId);  // no half-answered call
      return Status::InvalidArgument(
          "'state' is corrupted: key " + std::to_string(static_cast<int64_t>(keys[i])) +
          " is in the vocabulary without a valid id (a hand-built or damaged vocabulary; "
          "ValidateIntegerLookupState names the first bad slot).");
    }
  }
  return Status::Ok();
}

template Status IntegerLookupCpu(int64_t*, int64_t, int64_t, const int32_t*, int64_t, bool,
                                 int64_t*, const ParallelFor&);
template Status IntegerLookupCpu(int64_t*, int64_t, int64_t, const int64_t*, int64_t, bool,
                                 int64_t*, const ParallelFor&);

}  // namespace distributed_embeddings
