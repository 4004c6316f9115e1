// TensorFlow kernels for the pooled embedding lookup ops, shared by the CPU and GPU registrations.
//
// Each op kernel validates its inputs' ranks and sizes up front with OP_REQUIRES, then hands raw
// pointers to a per-device functor that calls the framework-free kernel library, which checks ids
// and row_splits before touching any memory. Kernel-library errors become InvalidArgument (caller
// error) or Internal (ours) and are prefixed with the op's name.
#ifndef DISTRIBUTED_EMBEDDINGS_EMBEDDING_OPS_EMBEDDING_LOOKUP_KERNELS_H_
#define DISTRIBUTED_EMBEDDINGS_EMBEDDING_OPS_EMBEDDING_LOOKUP_KERNELS_H_

#include <string>

#include "embedding/kernels/embedding_lookup.h"
#include "embedding/ops/op_util.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/resource_mgr.h"
#include "tensorflow/core/framework/resource_var.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_shape.h"

namespace distributed_embeddings {

// Shared input checks, each returning InvalidArgument that names `op` and the offending input.
absl::Status CheckCsrInputs(const std::string& op, const tensorflow::Tensor& ids,
                            const tensorflow::Tensor& row_splits);
absl::Status CheckParams(const std::string& op, const tensorflow::Tensor& params);
absl::Status CheckGradInputs(const std::string& op, const tensorflow::Tensor& grad,
                             const tensorflow::Tensor& row_splits,
                             const tensorflow::Tensor& num_rows);
absl::Status CheckSparseInputs(const std::string& op, const tensorflow::Tensor& indices,
                               const tensorflow::Tensor& dense_shape);
// 'weights' holds one value per id: 1-D with as many elements as 'ids'.
absl::Status CheckWeights(const std::string& op, const tensorflow::Tensor& weights,
                          const tensorflow::Tensor& ids);

// Reads the 'combiner' and 'bounds_check' attrs every lookup op has.
absl::Status ReadLookupAttrs(tensorflow::OpKernelConstruction* ctx, Combiner* combiner,
                             BoundsCheck* bounds_check);

// The kernel library's type for a TensorFlow dtype: its own half types stand for Eigen's, which
// have the same two-byte layout.
template <typename T>
struct KernelTypeOf {
  using type = T;
};
template <>
struct KernelTypeOf<Eigen::half> {
  using type = Float16;
};
template <>
struct KernelTypeOf<Eigen::bfloat16> {
  using type = BFloat16;
};
template <typename T>
using KernelType = typename KernelTypeOf<T>::type;

template <typename T>
const KernelType<T>* KernelPointer(const T* pointer) {
  static_assert(sizeof(KernelType<T>) == sizeof(T), "same layout");
  return reinterpret_cast<const KernelType<T>*>(pointer);
}

template <typename T>
KernelType<T>* KernelPointer(T* pointer) {
  static_assert(sizeof(KernelType<T>) == sizeof(T), "same layout");
  return reinterpret_cast<KernelType<T>*>(pointer);
}

// The device-specific halves; specialized in embedding_lookup_kernels.cc (CPU) and
// embedding_lookup_kernels_gpu.cc (GPU). T is the table's dtype and OutT the output's (T, or
// float for half tables); `weights` (one per id, of OutT) is null for unweighted bags.
template <typename Device, typename T, typename OutT, typename IdT, typename OffsetT>
struct LookupFunctor {
  static Status Forward(tensorflow::OpKernelContext* ctx, const T* params, int64_t num_rows,
                        int64_t width, const CsrIds<IdT, OffsetT>& csr, const OutT* weights,
                        Combiner combiner, BoundsCheck bounds_check, OutT* output);
  // Computes the sparse gradient (of T) of `grad` (of OutT) into temporaries of capacity
  // MaxUniqueIds rows and sets outputs 0 (unique ids) and 1 (their gradient rows) to the filled
  // prefix.
  static Status Backward(tensorflow::OpKernelContext* ctx, const tensorflow::Tensor& grad,
                         int64_t num_rows, const CsrIds<IdT, OffsetT>& csr, const OutT* weights,
                         Combiner combiner, BoundsCheck bounds_check);
};

// The weights input of a weighted op (null for an unweighted one), once CheckWeights passed.
template <typename T, bool kWeighted>
const T* WeightsOf(tensorflow::OpKernelContext* ctx, int index) {
  if constexpr (kWeighted) {
    return ctx->input(index).flat<T>().data();
  } else {
    return nullptr;
  }
}

template <typename Device, typename OffsetT>
struct SparseRowSplitsFunctor {
  static Status Compute(tensorflow::OpKernelContext* ctx, const int64_t* indices, int64_t nnz,
                        int64_t num_rows, int64_t num_cols, OffsetT* row_splits);
};

template <typename IdT, typename OffsetT>
CsrIds<IdT, OffsetT> CsrFromTensors(const tensorflow::Tensor& ids,
                                    const tensorflow::Tensor& row_splits) {
  return CsrIds<IdT, OffsetT>{ids.flat<IdT>().data(), ids.NumElements(),
                              row_splits.flat<OffsetT>().data(), row_splits.NumElements() - 1};
}

// The backward's two outputs, unique ids and their summed gradient rows: temp buffers with room
// for `capacity` rows, handed out as outputs trimmed to `num_unique` rows (a slice, no copy).
struct UniqueGradOutputs {
  tensorflow::Tensor ids;
  tensorflow::Tensor grad;

  // The op checked that [capacity, width] is a valid shape (UniqueGradShape).
  template <typename T, typename IdT>
  Status Allocate(tensorflow::OpKernelContext* ctx, int64_t capacity, int64_t width) {
    absl::Status allocated = ctx->allocate_temp(tensorflow::DataTypeToEnum<IdT>::v(),
                                                tensorflow::TensorShape({capacity}), &ids);
    if (allocated.ok()) {
      allocated = ctx->allocate_temp(tensorflow::DataTypeToEnum<T>::v(),
                                     tensorflow::TensorShape({capacity, width}), &grad);
    }
    if (allocated.ok()) return Status::Ok();
    return absl::IsResourceExhausted(allocated)
               ? Status::ResourceExhausted(std::string(allocated.message()))
               : Status::Internal(std::string(allocated.message()));
  }

  void SetOutputs(tensorflow::OpKernelContext* ctx, int64_t num_unique) const {
    ctx->set_output(0, ids.Slice(0, num_unique));
    ctx->set_output(1, grad.Slice(0, num_unique));
  }
};

// DePooledEmbeddingLookup (kResource = false) and DeResourcePooledEmbeddingLookup (true); with
// kWeighted, their weighted forms, whose input 3 is 'weights'.
template <typename Device, typename T, typename OutT, typename IdT, typename OffsetT,
          bool kResource, bool kWeighted = false>
class PooledLookupOp : public tensorflow::OpKernel {
 public:
  explicit PooledLookupOp(tensorflow::OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ReadLookupAttrs(ctx, &combiner_, &bounds_check_));
  }

  void Compute(tensorflow::OpKernelContext* ctx) override {
    const tensorflow::Tensor& ids = ctx->input(1);
    const tensorflow::Tensor& row_splits = ctx->input(2);
    OP_REQUIRES_OK(ctx, CheckCsrInputs(type_string(), ids, row_splits));
    if constexpr (kWeighted) OP_REQUIRES_OK(ctx, CheckWeights(type_string(), ctx->input(3), ids));
    if constexpr (kResource) {
      tensorflow::core::RefCountPtr<tensorflow::Var> variable;
      OP_REQUIRES_OK(
          ctx, tensorflow::LookupResource(ctx, tensorflow::HandleFromInput(ctx, 0), &variable));
      // Reading under the shared lock, in place: no copy even in copy-on-read mode.
      tensorflow::tf_shared_lock lock(*variable->mu());
      OP_REQUIRES_OK(ctx, CheckVariableValue(type_string(), variable.get(),
                                             tensorflow::DataTypeToEnum<T>::v()));
      const tensorflow::Tensor& params = *variable->tensor();
      Run(ctx, params, ids, row_splits);
    } else {
      Run(ctx, ctx->input(0), ids, row_splits);
    }
  }

 private:
  void Run(tensorflow::OpKernelContext* ctx, const tensorflow::Tensor& params,
           const tensorflow::Tensor& ids, const tensorflow::Tensor& row_splits) {
    OP_REQUIRES_OK(ctx, CheckParams(type_string(), params));
    const int64_t batch = row_splits.NumElements() - 1;
    const int64_t width = params.dim_size(1);
    tensorflow::TensorShape output_shape;
    OP_REQUIRES_OK(
        ctx, MakeShape(type_string(), "the output [batch, width]", {batch, width}, &output_shape));
    tensorflow::Tensor* output = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, output_shape, &output));
    OP_REQUIRES_OK(ctx, ToTfStatus(LookupFunctor<Device, T, OutT, IdT, OffsetT>::Forward(
                                       ctx, params.flat<T>().data(), params.dim_size(0), width,
                                       CsrFromTensors<IdT, OffsetT>(ids, row_splits),
                                       WeightsOf<OutT, kWeighted>(ctx, 3), combiner_, bounds_check_,
                                       output->flat<OutT>().data()),
                                   type_string()));
  }

  Combiner combiner_;
  BoundsCheck bounds_check_;
};

// DePooledEmbeddingLookupGrad; with kWeighted, DeWeightedPooledEmbeddingLookupGrad, whose input 4
// is 'weights'.
template <typename Device, typename T, typename OutT, typename IdT, typename OffsetT,
          bool kWeighted = false>
class PooledLookupGradOp : public tensorflow::OpKernel {
 public:
  explicit PooledLookupGradOp(tensorflow::OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ReadLookupAttrs(ctx, &combiner_, &bounds_check_));
  }

  void Compute(tensorflow::OpKernelContext* ctx) override {
    const tensorflow::Tensor& grad = ctx->input(0);
    const tensorflow::Tensor& ids = ctx->input(1);
    const tensorflow::Tensor& row_splits = ctx->input(2);
    const tensorflow::Tensor& num_rows = ctx->input(3);
    OP_REQUIRES_OK(ctx, CheckCsrInputs(type_string(), ids, row_splits));
    OP_REQUIRES_OK(ctx, CheckGradInputs(type_string(), grad, row_splits, num_rows));
    if constexpr (kWeighted) OP_REQUIRES_OK(ctx, CheckWeights(type_string(), ctx->input(4), ids));
    // The outputs have room for one row per distinct id: at most min(nnz, num_rows).
    tensorflow::TensorShape unique_grad_shape;
    OP_REQUIRES_OK(ctx, MakeShape(type_string(), "'unique_grad' [min(len(ids), num_rows), width]",
                                  {MaxUniqueIds(ids.NumElements(), num_rows.scalar<int64_t>()()),
                                   grad.dim_size(1)},
                                  &unique_grad_shape));
    OP_REQUIRES_OK(ctx,
                   ToTfStatus(LookupFunctor<Device, T, OutT, IdT, OffsetT>::Backward(
                                  ctx, grad, num_rows.scalar<int64_t>()(),
                                  CsrFromTensors<IdT, OffsetT>(ids, row_splits),
                                  WeightsOf<OutT, kWeighted>(ctx, 4), combiner_, bounds_check_),
                              type_string()));
  }

 private:
  Combiner combiner_;
  BoundsCheck bounds_check_;
};

template <typename Device, typename OffsetT>
class SparseRowSplitsOp : public tensorflow::OpKernel {
 public:
  explicit SparseRowSplitsOp(tensorflow::OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(tensorflow::OpKernelContext* ctx) override {
    const tensorflow::Tensor& indices = ctx->input(0);
    const tensorflow::Tensor& dense_shape = ctx->input(1);
    OP_REQUIRES_OK(ctx, CheckSparseInputs(type_string(), indices, dense_shape));
    const int64_t num_rows = dense_shape.vec<int64_t>()(0);
    const int64_t num_cols = dense_shape.vec<int64_t>()(1);
    // CheckSparseInputs keeps num_rows below INT64_MAX, so num_rows + 1 does not overflow.
    tensorflow::TensorShape splits_shape;
    OP_REQUIRES_OK(ctx, MakeShape(type_string(), "'row_splits'", {num_rows + 1}, &splits_shape));
    tensorflow::Tensor* row_splits = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, splits_shape, &row_splits));
    OP_REQUIRES_OK(ctx, ToTfStatus(SparseRowSplitsFunctor<Device, OffsetT>::Compute(
                                       ctx, indices.flat<int64_t>().data(), indices.dim_size(0),
                                       num_rows, num_cols, row_splits->flat<OffsetT>().data()),
                                   type_string()));
  }
};

// Registers every lookup kernel of one (table dtype T, output dtype OutT, ids, splits) for one
// device (DEVICE_CPU with Eigen::ThreadPoolDevice, or DEVICE_GPU with Eigen::GpuDevice). Scalars
// the kernels read on the host are HostMemory, which is a no-op on the CPU.
#define DE_REGISTER_LOOKUP_KERNELS(DEVICE, EigenDevice, T, OutT, IdT, OffsetT)              \
  REGISTER_KERNEL_BUILDER(Name("DePooledEmbeddingLookup")                                   \
                              .Device(tensorflow::DEVICE)                                   \
                              .TypeConstraint<T>("T")                                       \
                              .TypeConstraint<OutT>("Tout")                                 \
                              .TypeConstraint<IdT>("Tindices")                              \
                              .TypeConstraint<OffsetT>("Tsplits"),                          \
                          PooledLookupOp<EigenDevice, T, OutT, IdT, OffsetT, false>);       \
  REGISTER_KERNEL_BUILDER(Name("DeResourcePooledEmbeddingLookup")                           \
                              .Device(tensorflow::DEVICE)                                   \
                              .HostMemory("resource")                                       \
                              .TypeConstraint<T>("dtype")                                   \
                              .TypeConstraint<OutT>("Tout")                                 \
                              .TypeConstraint<IdT>("Tindices")                              \
                              .TypeConstraint<OffsetT>("Tsplits"),                          \
                          PooledLookupOp<EigenDevice, T, OutT, IdT, OffsetT, true>);        \
  REGISTER_KERNEL_BUILDER(Name("DePooledEmbeddingLookupGrad")                               \
                              .Device(tensorflow::DEVICE)                                   \
                              .HostMemory("num_rows")                                       \
                              .TypeConstraint<T>("T")                                       \
                              .TypeConstraint<OutT>("Tout")                                 \
                              .TypeConstraint<IdT>("Tindices")                              \
                              .TypeConstraint<OffsetT>("Tsplits"),                          \
                          PooledLookupGradOp<EigenDevice, T, OutT, IdT, OffsetT>);          \
  REGISTER_KERNEL_BUILDER(Name("DeWeightedPooledEmbeddingLookup")                           \
                              .Device(tensorflow::DEVICE)                                   \
                              .TypeConstraint<T>("T")                                       \
                              .TypeConstraint<OutT>("Tout")                                 \
                              .TypeConstraint<IdT>("Tindices")                              \
                              .TypeConstraint<OffsetT>("Tsplits"),                          \
                          PooledLookupOp<EigenDevice, T, OutT, IdT, OffsetT, false, true>); \
  REGISTER_KERNEL_BUILDER(Name("DeResourceWeightedPooledEmbeddingLookup")                   \
                              .Device(tensorflow::DEVICE)                                   \
                              .HostMemory("resource")                                       \
                              .TypeConstraint<T>("dtype")                                   \
                              .TypeConstraint<OutT>("Tout")                                 \
                              .TypeConstraint<IdT>("Tindices")                              \
                              .TypeConstraint<OffsetT>("Tsplits"),                          \
                          PooledLookupOp<EigenDevice, T, OutT, IdT, OffsetT, true, true>);  \
  REGISTER_KERNEL_BUILDER(Name("DeWeightedPooledEmbeddingLookupGrad")                       \
                              .Device(tensorflow::DEVICE)                                   \
                              .HostMemory("num_rows")                                       \
                              .TypeConstraint<T>("T")                                       \
                              .TypeConstraint<OutT>("Tout")                                 \
                              .TypeConstraint<IdT>("Tindices")                              \
                              .TypeConstraint<OffsetT>("Tsplits"),                          \
                          PooledLookupGradOp<EigenDevice, T, OutT, IdT, OffsetT, true>);

#define DE_REGISTER_LOOKUP_KERNELS_ALL_IDS(DEVICE, EigenDevice, T, OutT)     \
  DE_REGISTER_LOOKUP_KERNELS(DEVICE, EigenDevice, T, OutT, int32_t, int32_t) \
  DE_REGISTER_LOOKUP_KERNELS(DEVICE, EigenDevice, T, OutT, int32_t, int64_t) \
  DE_REGISTER_LOOKUP_KERNELS(DEVICE, EigenDevice, T, OutT, int64_t, int32_t) \
  DE_REGISTER_LOOKUP_KERNELS(DEVICE, EigenDevice, T, OutT, int64_t, int64_t)

// The (table, output) dtype pairs: float and double tables give their own dtype; half and
// bfloat16 tables give theirs or float.
#define DE_REGISTER_ALL_LOOKUP_KERNELS(DEVICE, EigenDevice)                                 \
  DE_REGISTER_LOOKUP_KERNELS_ALL_IDS(DEVICE, EigenDevice, float, float)                     \
  DE_REGISTER_LOOKUP_KERNELS_ALL_IDS(DEVICE, EigenDevice, double, double)                   \
  DE_REGISTER_LOOKUP_KERNELS_ALL_IDS(DEVICE, EigenDevice, Eigen::half, Eigen::half)         \
  DE_REGISTER_LOOKUP_KERNELS_ALL_IDS(DEVICE, EigenDevice, Eigen::half, float)               \
  DE_REGISTER_LOOKUP_KERNELS_ALL_IDS(DEVICE, EigenDevice, Eigen::bfloat16, Eigen::bfloat16) \
  DE_REGISTER_LOOKUP_KERNELS_ALL_IDS(DEVICE, EigenDevice, Eigen::bfloat16, float)           \
  REGISTER_KERNEL_BUILDER(Name("DeSparseRowSplits")                                         \
                              .Device(tensorflow::DEVICE)                                   \
                              .HostMemory("dense_shape")                                    \
                              .TypeConstraint<int32_t>("out_type"),                         \
                          SparseRowSplitsOp<EigenDevice, int32_t>);                         \
  REGISTER_KERNEL_BUILDER(Name("DeSparseRowSplits")                                         \
                              .Device(tensorflow::DEVICE)                                   \
                              .HostMemory("dense_shape")                                    \
                              .TypeConstraint<int64_t>("out_type"),                         \
                          SparseRowSplitsOp<EigenDevice, int64_t>);

}  // namespace distributed_embeddings

#endif  // DISTRIBUTED_EMBEDDINGS_EMBEDDING_OPS_EMBEDDING_LOOKUP_KERNELS_H_
