// A C ABI over the CUDA kernel library, for the GPU benchmark: Python (ctypes) passes the device
// pointers of PyTorch tensors, so our kernels and torch's run on the very same buffers.
// float params, int64 ids and row_splits; combiner 0 = sum, 1 = mean. Each function returns 0,
// or 1 with the error message copied into `error`.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>

#include "embedding/kernels/embedding_lookup.h"
#include "embedding/kernels/embedding_lookup_cuda.h"

namespace {

using distributed_embeddings::BoundsCheck;
using distributed_embeddings::Combiner;
using distributed_embeddings::CsrIds;
using distributed_embeddings::Status;

int Report(const Status& status, char* error, size_t error_len) {
  if (status.ok()) return 0;
  if (error != nullptr && error_len > 0) {
    const std::string& message = status.message();
    const size_t n = std::min(message.size(), error_len - 1);
    std::memcpy(error, message.data(), n);
    error[n] = '\0';
  }
  return 1;
}

CsrIds<int64_t, int64_t> Csr(const int64_t* ids, int64_t nnz, const int64_t* row_splits,
                             int64_t batch) {
  CsrIds<int64_t, int64_t> csr;
  csr.ids = ids;
  csr.nnz = nnz;
  csr.row_splits = row_splits;
  csr.batch = batch;
  return csr;
}

}  // namespace

extern "C" {

size_t de_forward_workspace_bytes() { return distributed_embeddings::ValidationWorkspaceBytes(); }

size_t de_backward_workspace_bytes(int64_t nnz, int64_t batch) {
  return distributed_embeddings::PooledLookupBackwardCudaWorkspaceBytes<float, int64_t, int64_t>(
      nnz, batch);
}

int de_forward(const float* params, int64_t num_rows, int64_t width, const int64_t* ids,
               int64_t nnz, const int64_t* row_splits, int64_t batch, int combiner, float* output,
               void* workspace, size_t workspace_bytes, void* stream, char* error,
               size_t error_len) {
  return Report(distributed_embeddings::PooledLookupForwardCuda(
                    params, num_rows, width, Csr(ids, nnz, row_splits, batch),
                    combiner == 1 ? Combiner::kMean : Combiner::kSum, BoundsCheck::kError, output,
                    workspace, workspace_bytes, static_cast<cudaStream_t>(stream)),
                error, error_len);
}

int de_backward(const float* grad_output, int64_t num_rows, int64_t width, const int64_t* ids,
                int64_t nnz, const int64_t* row_splits, int64_t batch, int combiner,
                int64_t* unique_ids, float* unique_grad, int64_t* num_unique, void* workspace,
                size_t workspace_bytes, void* stream, char* error, size_t error_len) {
  return Report(
      distributed_embeddings::PooledLookupBackwardCuda(
          grad_output, num_rows, width, Csr(ids, nnz, row_splits, batch),
          combiner == 1 ? Combiner::kMean : Combiner::kSum, BoundsCheck::kError, unique_ids,
          unique_grad, num_unique, workspace, workspace_bytes, static_cast<cudaStream_t>(stream)),
      error, error_len);
}

}  // extern "C"
