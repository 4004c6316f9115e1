// GPU functor and registration of DeIntegerLookup, built only under --config=cuda.
#if GOOGLE_CUDA
#define EIGEN_USE_GPU

#include "embedding/kernels/integer_lookup_cuda.h"
#include "embedding/ops/integer_lookup_kernels.h"
#include "unsupported/Eigen/CXX11/Tensor"

namespace distributed_embeddings {

using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using GPUDevice = Eigen::GpuDevice;

template <typename KeyT>
struct IntegerLookupFunctor<GPUDevice, KeyT> {
  static Status Copy(OpKernelContext* ctx, const Tensor& from, Tensor* to) {
    const cudaError_t error =
        cudaMemcpyAsync(to->flat<int64_t>().data(), from.flat<int64_t>().data(),
                        from.NumElements() * sizeof(int64_t), cudaMemcpyDeviceToDevice,
                        ctx->eigen_gpu_device().stream());
    return error == cudaSuccess ? Status::Ok() : Status::Internal(cudaGetErrorString(error));
  }

  static Status Lookup(OpKernelContext* ctx, int64_t* state, int64_t state_size, int64_t max_tokens,
                       const KeyT* keys, int64_t n, bool insert, int64_t* ids) {
    return IntegerLookupCuda(state, state_size, max_tokens, keys, n, insert, ids,
                             ctx->eigen_gpu_device().stream());
  }
};

#define DE_REGISTER_GPU_INTEGER_LOOKUP(KeyT)                  \
  REGISTER_KERNEL_BUILDER(Name("DeIntegerLookup")             \
                              .Device(tensorflow::DEVICE_GPU) \
                              .HostMemory("state")            \
                              .TypeConstraint<KeyT>("Tkeys"), \
                          IntegerLookupOp<GPUDevice, KeyT>);

DE_REGISTER_GPU_INTEGER_LOOKUP(int32_t)
DE_REGISTER_GPU_INTEGER_LOOKUP(int64_t)

#undef DE_REGISTER_GPU_INTEGER_LOOKUP

}  // namespace distributed_embeddings

#endif  // GOOGLE_CUDA
