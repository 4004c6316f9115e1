// IntegerLookup: an insert-only hash map from arbitrary int64 keys to contiguous ids, kept in
// caller memory so a framework can store it in a variable and checkpoint it like any tensor.
//
// State layout (int64, IntegerLookupStateSize(max_tokens) elements):
//   state[0]                   the number of ids handed out so far, in [0, max_tokens];
//   state[1 + 2 * s]           the key of slot s, or kEmptyKey;
//   state[1 + 2 * s + 1]       its id, or kPendingId while the inserting thread is writing it.
// The number of slots is a power of two at least twice max_tokens, so probes stay short.
//
// Ids are 1..max_tokens in order of first appearance; 0 is out-of-vocabulary (OOV): key -1 (Keras'
// OOV token), every key first met once the vocabulary is full (it stays OOV), and, when `insert` is
// false, every unknown key. Calls are thread-safe: concurrent inserts of one key give it one id.
// Within one CPU call new keys get ids in order of first occurrence, so serial training is
// deterministic. The CUDA version assigns the new keys of one call in an order that depends on
// thread scheduling, and when a call holds more new keys than ids are left, which of them get
// the last ids depends on scheduling too. A lookup waits a bounded time for an id another
// thread is writing: a state with a key but no id (hand-built, damaged) is an error on the CPU
// and maps that key to OOV on the GPU, never a hang.
#ifndef DISTRIBUTED_EMBEDDINGS_EMBEDDING_KERNELS_INTEGER_LOOKUP_H_
#define DISTRIBUTED_EMBEDDINGS_EMBEDDING_KERNELS_INTEGER_LOOKUP_H_

#include <cstdint>
#include <limits>

#include "embedding/kernels/parallel.h"
#include "embedding/kernels/status.h"

namespace distributed_embeddings {

constexpr int64_t kEmptyKey = std::numeric_limits<int64_t>::min();
constexpr int64_t kPendingId = -1;
constexpr int64_t kOovId = 0;
constexpr int64_t kOovKey = -1;

// The largest max_tokens: a state of that size would already be 32 TiB.
constexpr int64_t kMaxIntegerLookupTokens = int64_t{1} << 40;

// Slots of the table for `max_tokens` ids.
int64_t IntegerLookupSlots(int64_t max_tokens);

// Elements of the state for `max_tokens` ids: the count plus two per slot.
inline int64_t IntegerLookupStateSize(int64_t max_tokens) {
  return 1 + 2 * IntegerLookupSlots(max_tokens);
}

// Writes the state of an empty vocabulary (host memory).
void InitIntegerLookupState(int64_t* state, int64_t max_tokens);

// Checks that a state of `state_size` elements fits `max_tokens`; call before reading the state.
Status ValidateIntegerLookupStateSize(int64_t state_size, int64_t max_tokens);
// Checks the vocabulary size a state holds (state[0]).
Status ValidateIntegerLookupCount(int64_t count, int64_t max_tokens);
// Checks a whole state at rest (host memory), as loading one from outside must: its size and
// count, and that every occupied slot holds a key other than the OOV key with an id in
// [0, count]. A lookup on a state that fails this may return InvalidArgument (CPU) or OOV.
Status ValidateIntegerLookupState(const int64_t* state, int64_t state_size, int64_t max_tokens);

// IntegerLookupCpu writes ids[i] for each of the `n` keys, inserting unknown keys when `insert`.
template <typename KeyT>
Status IntegerLookupCpu(int64_t* state, int64_t state_size, int64_t max_tokens, const KeyT* keys,
                        int64_t n, bool insert, int64_t* ids,
                        const ParallelFor& parallel_for = ParallelFor());

}  // namespace distributed_embeddings

#endif  // DISTRIBUTED_EMBEDDINGS_EMBEDDING_KERNELS_INTEGER_LOOKUP_H_
