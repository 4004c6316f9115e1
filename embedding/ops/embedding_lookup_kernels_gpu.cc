// GPU functors and kernel registrations, built only under --config=cuda.
//
// Compiled by the host C++ compiler: the CUDA work lives in the kernel library, which takes the
// op's stream, so no TensorFlow header ever goes through nvcc. Scratch memory comes from
// TensorFlow's allocator through allocate_temp.
#if GOOGLE_CUDA
#define EIGEN_USE_GPU

#include <type_traits>

#include "embedding/kernels/embedding_lookup_cuda.h"
#include "embedding/ops/embedding_lookup_kernels.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "unsupported/Eigen/CXX11/Tensor"

namespace distributed_embeddings {

using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using GPUDevice = Eigen::GpuDevice;

namespace {

cudaStream_t StreamOf(OpKernelContext* ctx) { return ctx->eigen_gpu_device().stream(); }

Status AllocateBytes(OpKernelContext* ctx, size_t bytes, Tensor* tensor) {
  const absl::Status status = ctx->allocate_temp(
      tensorflow::DT_INT8, tensorflow::TensorShape({static_cast<int64_t>(bytes)}), tensor);
  return status.ok() ? Status::Ok() : Status::Internal(std::string(status.message()));
}

}  // namespace

template <typename T, typename OutT, typename IdT, typename OffsetT>
struct LookupFunctor<GPUDevice, T, OutT, IdT, OffsetT> {
  static Status Forward(OpKernelContext* ctx, const T* params, int64_t num_rows, int64_t width,
                        const CsrIds<IdT, OffsetT>& csr, const OutT* weights, Combiner combiner,
                        BoundsCheck bounds_check, OutT* output) {
    Tensor workspace;
    DE_RETURN_IF_ERROR(AllocateBytes(ctx, ValidationWorkspaceBytes(), &workspace));
    void* scratch = workspace.flat<int8_t>().data();
    if constexpr (kIsHalf<KernelType<T>>) {
      return HalfPooledLookupForwardCuda(
          KernelPointer(params), num_rows, width, csr, KernelPointer(weights), combiner,
          bounds_check, KernelPointer(output), scratch, ValidationWorkspaceBytes(), StreamOf(ctx));
    } else {
      static_assert(std::is_same_v<T, OutT>, "float and double tables give their own dtype");
      if (weights != nullptr) {
        return WeightedPooledLookupForwardCuda(params, num_rows, width, csr, weights, combiner,
                                               bounds_check, output, scratch,
                                               ValidationWorkspaceBytes(), StreamOf(ctx));
      }
      return PooledLookupForwardCuda(params, num_rows, width, csr, combiner, bounds_check, output,
                                     scratch, ValidationWorkspaceBytes(), StreamOf(ctx));
    }
  }

  static Status Backward(OpKernelContext* ctx, const Tensor& grad, int64_t num_rows,
                         const CsrIds<IdT, OffsetT>& csr, const OutT* weights, Combiner combiner,
                         BoundsCheck bounds_check) {
    const int64_t width = grad.dim_size(1);
    const int64_t capacity = MaxUniqueIds(csr.nnz, num_rows);
    const size_t bytes =
        PooledLookupBackwardCudaWorkspaceBytes<KernelType<T>, IdT, OffsetT>(csr.nnz, csr.batch);
    Tensor workspace;
    DE_RETURN_IF_ERROR(AllocateBytes(ctx, bytes, &workspace));
    void* scratch = workspace.flat<int8_t>().data();
    UniqueGradOutputs unique;
    DE_RETURN_IF_ERROR((unique.Allocate<T, IdT>(ctx, capacity, width)));
    const OutT* grad_output = grad.flat<OutT>().data();
    IdT* unique_ids = unique.ids.flat<IdT>().data();
    T* unique_grad = unique.grad.flat<T>().data();
    int64_t num_unique = 0;
    if constexpr (kIsHalf<KernelType<T>>) {
      DE_RETURN_IF_ERROR(HalfPooledLookupBackwardCuda(
          KernelPointer(grad_output), num_rows, width, csr, KernelPointer(weights), combiner,
          bounds_check, unique_ids, KernelPointer(unique_grad), &num_unique, scratch, bytes,
          StreamOf(ctx)));
    } else if (weights != nullptr) {
      DE_RETURN_IF_ERROR(WeightedPooledLookupBackwardCuda(
          grad_output, num_rows, width, csr, weights, combiner, bounds_check, unique_ids,
          unique_grad, &num_unique, scratch, bytes, StreamOf(ctx)));
    } else {
      DE_RETURN_IF_ERROR(PooledLookupBackwardCuda(grad_output, num_rows, width, csr, combiner,
                                                  bounds_check, unique_ids, unique_grad,
                                                  &num_unique, scratch, bytes, StreamOf(ctx)));
    }
    unique.SetOutputs(ctx, num_unique);
    return Status::Ok();
  }
};

template <typename OffsetT>
struct SparseRowSplitsFunctor<GPUDevice, OffsetT> {
  static Status Compute(OpKernelContext* ctx, const int64_t* indices, int64_t nnz, int64_t num_rows,
                        int64_t num_cols, OffsetT* row_splits) {
    Tensor workspace;
    DE_RETURN_IF_ERROR(AllocateBytes(ctx, ValidationWorkspaceBytes(), &workspace));
    return CooToRowSplitsCuda(indices, nnz, num_rows, num_cols, row_splits,
                              workspace.flat<int8_t>().data(), ValidationWorkspaceBytes(),
                              StreamOf(ctx));
  }
};

DE_REGISTER_ALL_LOOKUP_KERNELS(DEVICE_GPU, GPUDevice)

}  // namespace distributed_embeddings

#endif  // GOOGLE_CUDA
