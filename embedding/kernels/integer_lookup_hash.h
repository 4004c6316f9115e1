// The slot hash of IntegerLookup, shared by the CPU and CUDA versions so that a state written on
// one device reads the same on the other.
#ifndef DISTRIBUTED_EMBEDDINGS_EMBEDDING_KERNELS_INTEGER_LOOKUP_HASH_H_
#define DISTRIBUTED_EMBEDDINGS_EMBEDDING_KERNELS_INTEGER_LOOKUP_HASH_H_

#include <cstdint>

#ifdef __CUDACC__
#define DE_HOST_DEVICE __host__ __device__
#else
#define DE_HOST_DEVICE
#endif

namespace distributed_embeddings {

// First slot probed for `key` in a table of mask + 1 slots (a power of two).
DE_HOST_DEVICE inline uint64_t IntegerLookupHomeSlot(int64_t key, uint64_t mask) {
  const uint64_t h = static_cast<uint64_t>(key) * 0x9E3779B97F4A7C15ull;  // Fibonacci hashing
  return (h ^ (h >> 29)) & mask;
}

}  // namespace distributed_embeddings

#endif  // DISTRIBUTED_EMBEDDINGS_EMBEDDING_KERNELS_INTEGER_LOOKUP_HASH_H_
