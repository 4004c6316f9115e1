// Input checks shared by every device, the CPU functors, and the CPU kernel registrations.
#include "embedding/ops/embedding_lookup_kernels.h"

#include <limits>
#include <type_traits>

#include "embedding/kernels/huge_pages.h"
#include "tensorflow/core/framework/register_types.h"
#include "tensorflow/core/framework/tensor_shape.h"
#include "tensorflow/core/util/work_sharder.h"

namespace distributed_embeddings {

using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShapeUtils;
using CPUDevice = Eigen::ThreadPoolDevice;

absl::Status CheckCsrInputs(const std::string& op, const Tensor& ids, const Tensor& row_splits) {
  if (!TensorShapeUtils::IsVector(ids.shape())) {
    return absl::InvalidArgumentError(op + ": 'ids' must be 1-D; got shape " +
                                      ids.shape().DebugString() + ".");
  }
  if (!TensorShapeUtils::IsVector(row_splits.shape()) || row_splits.NumElements() < 1) {
    return absl::InvalidArgumentError(
        op + ": 'row_splits' must be 1-D with at least 1 element; got shape " +
        row_splits.shape().DebugString() + ".");
  }
  return absl::OkStatus();
}

absl::Status CheckParams(const std::string& op, const Tensor& params) {
  if (!TensorShapeUtils::IsMatrix(params.shape())) {
    return absl::InvalidArgumentError(op + ": 'params' must be a 2-D table; got shape " +
                                      params.shape().DebugString() + ".");
  }
  return absl::OkStatus();
}

absl::Status CheckGradInputs(const std::string& op, const Tensor& grad, const Tensor& row_splits,
                             const Tensor& num_rows) {
  if (!TensorShapeUtils::IsMatrix(grad.shape()) ||
      grad.dim_size(0) != row_splits.NumElements() - 1) {
    return absl::InvalidArgumentError(
        op + ": 'grad' must be [batch, width] with batch = len(row_splits) - 1 = " +
        std::to_string(row_splits.NumElements() - 1) + "; got shape " + grad.shape().DebugString() +
        ".");
  }
  if (!TensorShapeUtils::IsScalar(num_rows.shape()) || num_rows.scalar<int64_t>()() < 0) {
    return absl::InvalidArgumentError(op + ": 'num_rows' must be a non-negative scalar; got " +
                                      num_rows.DebugString() + ".");
  }
  return absl::OkStatus();
}

absl::Status CheckSparseInputs(const std::string& op, const Tensor& indices,
                               const Tensor& dense_shape) {
  if (!TensorShapeUtils::IsMatrix(indices.shape()) || indices.dim_size(1) != 2) {
    return absl::InvalidArgumentError(
        op + ": 'indices' must be [nnz, 2] (a 2-D SparseTensor); got shape " +
        indices.shape().DebugString() + ".");
  }
  if (!TensorShapeUtils::IsVector(dense_shape.shape()) || dense_shape.NumElements() != 2 ||
      dense_shape.vec<int64_t>()(0) < 0 || dense_shape.vec<int64_t>()(1) < 0 ||
      dense_shape.vec<int64_t>()(0) == std::numeric_limits<int64_t>::max()) {
    return absl::InvalidArgumentError(op +
                                      ": 'dense_shape' must hold 2 non-negative sizes, the first "
                                      "below INT64_MAX (row_splits has one more element); got " +
                                      dense_shape.DebugString() + ".");
  }
  return absl::OkStatus();
}

absl::Status CheckWeights(const std::string& op, const Tensor& weights, const Tensor& ids) {
  if (!TensorShapeUtils::IsVector(weights.shape()) || weights.NumElements() != ids.NumElements()) {
    return absl::InvalidArgumentError(op + ": 'weights' must be 1-D with one weight per id (" +
                                      std::to_string(ids.NumElements()) + "); got shape " +
                                      weights.shape().DebugString() + ".");
  }
  return absl::OkStatus();
}

absl::Status ReadLookupAttrs(tensorflow::OpKernelConstruction* ctx, Combiner* combiner,
                             BoundsCheck* bounds_check) {
  std::string combiner_attr, bounds_check_attr;
  TF_RETURN_IF_ERROR(ctx->GetAttr("combiner", &combiner_attr));
  TF_RETURN_IF_ERROR(ctx->GetAttr("bounds_check", &bounds_check_attr));
  // The op definitions restrict both attrs to these values.
  *combiner = combiner_attr == "mean"    ? Combiner::kMean
              : combiner_attr == "sqrtn" ? Combiner::kSqrtn
                                         : Combiner::kSum;
  *bounds_check = bounds_check_attr == "skip" ? BoundsCheck::kSkip : BoundsCheck::kError;
  return absl::OkStatus();
}

template <typename T, typename OutT, typename IdT, typename OffsetT>
struct LookupFunctor<CPUDevice, T, OutT, IdT, OffsetT> {
  static Status Forward(OpKernelContext* ctx, const T* params, int64_t num_rows, int64_t width,
                        const CsrIds<IdT, OffsetT>& csr, const OutT* weights, Combiner combiner,
                        BoundsCheck bounds_check, OutT* output) {
    // TensorFlow's CPU allocator hands out 4 KiB pages; random row reads want huge ones, and so
    // does the first write of a large output.
    PromoteToHugePages(params, static_cast<size_t>(num_rows * width) * sizeof(T));
    const FirstWriteAdvice advice(output, static_cast<size_t>(csr.batch * width) * sizeof(OutT));
    if constexpr (kIsHalf<KernelType<T>>) {
      return HalfPooledLookupForwardCpu(KernelPointer(params), num_rows, width, csr,
                                        KernelPointer(weights), combiner, bounds_check,
                                        KernelPointer(output), CpuParallelFor(ctx));
    } else {
      static_assert(std::is_same_v<T, OutT>, "float and double tables give their own dtype");
      if (weights != nullptr) {
        return WeightedPooledLookupForwardCpu(params, num_rows, width, csr, weights, combiner,
                                              bounds_check, output, CpuParallelFor(ctx));
      }
      return PooledLookupForwardCpu(params, num_rows, width, csr, combiner, bounds_check, output,
                                    CpuParallelFor(ctx));
    }
  }

  static Status Backward(OpKernelContext* ctx, const Tensor& grad, int64_t num_rows,
                         const CsrIds<IdT, OffsetT>& csr, const OutT* weights, Combiner combiner,
                         BoundsCheck bounds_check) {
    const int64_t width = grad.dim_size(1);
    const int64_t capacity = MaxUniqueIds(csr.nnz, num_rows);
    UniqueGradOutputs unique;
    DE_RETURN_IF_ERROR((unique.Allocate<T, IdT>(ctx, capacity, width)));
    T* unique_grad = unique.grad.flat<T>().data();
    const FirstWriteAdvice advice(unique_grad, static_cast<size_t>(capacity * width) * sizeof(T));
    const OutT* grad_output = grad.flat<OutT>().data();
    IdT* unique_ids = unique.ids.flat<IdT>().data();
    int64_t num_unique = 0;
    if constexpr (kIsHalf<KernelType<T>>) {
      DE_RETURN_IF_ERROR(HalfPooledLookupBackwardCpu(
          KernelPointer(grad_output), num_rows, width, csr, KernelPointer(weights), combiner,
          bounds_check, unique_ids, KernelPointer(unique_grad), &num_unique, CpuParallelFor(ctx)));
    } else if (weights != nullptr) {
      DE_RETURN_IF_ERROR(WeightedPooledLookupBackwardCpu(
          grad_output, num_rows, width, csr, weights, combiner, bounds_check, unique_ids,
          unique_grad, &num_unique, CpuParallelFor(ctx)));
    } else {
      DE_RETURN_IF_ERROR(PooledLookupBackwardCpu(grad_output, num_rows, width, csr, combiner,
                                                 bounds_check, unique_ids, unique_grad, &num_unique,
                                                 CpuParallelFor(ctx)));
    }
    unique.SetOutputs(ctx, num_unique);
    return Status::Ok();
  }
};

template <typename OffsetT>
struct SparseRowSplitsFunctor<CPUDevice, OffsetT> {
  static Status Compute(OpKernelContext* ctx, const int64_t* indices, int64_t nnz, int64_t num_rows,
                        int64_t num_cols, OffsetT* row_splits) {
    return CooToRowSplitsCpu(indices, nnz, num_rows, num_cols, row_splits);
  }
};

DE_REGISTER_ALL_LOOKUP_KERNELS(DEVICE_CPU, CPUDevice)

}  // namespace distributed_embeddings
