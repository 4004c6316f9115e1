// CUDA IntegerLookup: a thread per key, slots claimed with atomicCAS and ids reserved with a CAS
// loop on the count, the same protocol as the CPU version.
#include <algorithm>
#include <string>

#include "embedding/kernels/integer_lookup_cuda.h"
#include "embedding/kernels/integer_lookup_hash.h"

namespace distributed_embeddings {
namespace {

using ULL = unsigned long long;

__device__ __forceinline__ int64_t LoadVolatile(const int64_t* p) {
  return *reinterpret_cast<const volatile int64_t*>(p);
}

__device__ int64_t ReserveIdOnDevice(int64_t* count, int64_t max_tokens) {
  int64_t current = LoadVolatile(count);
  while (current < max_tokens) {
    const int64_t seen = static_cast<int64_t>(atomicCAS(
        reinterpret_cast<ULL*>(count), static_cast<ULL>(current), static_cast<ULL>(current + 1)));
    if (seen == current) return current + 1;
    current = seen;
  }
  return kOovId;
}

// The id of `slot`, waiting a bounded time (about 0.4 s) for a concurrent insert to write it.
// A key with no valid id (a hand-built or damaged state) maps to OOV rather than hanging.
__device__ int64_t WaitForIdOnDevice(const int64_t* table, int64_t slot, int64_t max_tokens) {
  int64_t id = LoadVolatile(&table[2 * slot + 1]);
  for (int spins = 0; id == kPendingId && spins < (1 << 22); ++spins) {
#if __CUDA_ARCH__ >= 700
    __nanosleep(100);
#endif
    id = LoadVolatile(&table[2 * slot + 1]);
  }
  return id >= kOovId && id <= max_tokens ? id : kOovId;
}

template <typename KeyT>
__global__ void IntegerLookupKernel(int64_t* state, int64_t slots, int64_t max_tokens,
                                    const KeyT* keys, int64_t n, bool insert, int64_t* ids) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  int64_t* table = state + 1;
  const uint64_t mask = static_cast<uint64_t>(slots - 1);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += stride) {
    const int64_t key = static_cast<int64_t>(keys[i]);
    int64_t id = kOovId;
    if (key != kOovKey && key != kEmptyKey) {
      uint64_t slot = IntegerLookupHomeSlot(key, mask);
      for (int64_t probe = 0; probe < slots; ++probe, slot = (slot + 1) & mask) {
        int64_t current = LoadVolatile(&table[2 * slot]);
        if (current == key) {
          id = WaitForIdOnDevice(table, slot, max_tokens);
          break;
        }
        if (current != kEmptyKey) continue;
        if (!insert || LoadVolatile(state) >= max_tokens) break;
        current =
            static_cast<int64_t>(atomicCAS(reinterpret_cast<ULL*>(&table[2 * slot]),
                                           static_cast<ULL>(kEmptyKey), static_cast<ULL>(key)));
        if (current == kEmptyKey) {
          id = ReserveIdOnDevice(state, max_tokens);
          __threadfence();
          atomicExch(reinterpret_cast<ULL*>(&table[2 * slot + 1]), static_cast<ULL>(id));
          break;
        }
        if (current == key) {
          id = WaitForIdOnDevice(table, slot, max_tokens);
          break;
        }
      }
    }
    ids[i] = id;
  }
}

}  // namespace

template <typename KeyT>
Status IntegerLookupCuda(int64_t* state, int64_t state_size, int64_t max_tokens, const KeyT* keys,
                         int64_t n, bool insert, int64_t* ids, cudaStream_t stream) {
  DE_RETURN_IF_ERROR(ValidateIntegerLookupStateSize(state_size, max_tokens));
  int64_t count = 0;
  cudaError_t error = cudaMemcpyAsync(&count, state, sizeof(count), cudaMemcpyDeviceToHost, stream);
  if (error == cudaSuccess) error = cudaStreamSynchronize(stream);
  if (error != cudaSuccess) {
    return Status::Internal(std::string("IntegerLookupCuda: ") + cudaGetErrorString(error));
  }
  DE_RETURN_IF_ERROR(ValidateIntegerLookupCount(count, max_tokens));
  if (n == 0) return Status::Ok();
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((n + threads - 1) / threads, 65535 * 32);
  IntegerLookupKernel<<<static_cast<int>(blocks), threads, 0, stream>>>(
      state, (state_size - 1) / 2, max_tokens, keys, n, insert, ids);
  error = cudaGetLastError();
  if (error != cudaSuccess) {
    return Status::Internal(std::string("IntegerLookupKernel launch: ") +
                            cudaGetErrorString(error));
  }
  return Status::Ok();
}

template Status IntegerLookupCuda(int64_t*, int64_t, int64_t, const int32_t*, int64_t, bool,
                                  int64_t*, cudaStream_t);
template Status IntegerLookupCuda(int64_t*, int64_t, int64_t, const int64_t*, int64_t, bool,
                                  int64_t*, cudaStream_t);

}  // namespace distributed_embeddings
