// A kernel for cudart_stub_test: out[i] = value + i for i < n, launched with <<<>>> so the launch
// goes through the registration and launch hooks the stub forwards.
#ifndef DISTRIBUTED_EMBEDDINGS_THIRD_PARTY_CUDA_CUDART_STUB_TEST_KERNEL_H_
#define DISTRIBUTED_EMBEDDINGS_THIRD_PARTY_CUDA_CUDART_STUB_TEST_KERNEL_H_

#include <cuda_runtime_api.h>

namespace distributed_embeddings {

// Returns the launch's error.
cudaError_t LaunchFill(int* out, int n, int value, cudaStream_t stream);

}  // namespace distributed_embeddings

#endif  // DISTRIBUTED_EMBEDDINGS_THIRD_PARTY_CUDA_CUDART_STUB_TEST_KERNEL_H_
