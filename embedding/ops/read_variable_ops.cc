// DeReadVariableNoCopy: a resource variable's value without the copy TensorFlow's own read makes
// once the variable is in copy-on-read mode (the mode any sparse update leaves it in).
//
// The output aliases the variable's buffer, so a later in-place update of the variable shows
// through it; callers use it for reads that finish before the next update (weights export,
// dense reads inside one step), where a copy of a large table would be pure cost.
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/resource_mgr.h"
#include "tensorflow/core/framework/resource_var.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace distributed_embeddings {

using ::tensorflow::shape_inference::InferenceContext;

REGISTER_OP("DeReadVariableNoCopy")
    .Input("resource: resource")
    .Output("value: dtype")
    .Attr("dtype: type")
    .SetShapeFn([](InferenceContext* c) {
      const auto* handle_data = c->input_handle_shapes_and_types(0);
      c->set_output(0, handle_data != nullptr && !handle_data->empty() ? (*handle_data)[0].shape
                                                                       : c->UnknownShape());
      return absl::OkStatus();
    })
    .Doc(R"doc(
Reads a resource variable without copying its buffer, even in copy-on-read mode.

value: aliases the variable's buffer; in-place updates made after the read show through it.
)doc");

namespace {

class ReadVariableNoCopyOp : public tensorflow::OpKernel {
 public:
  explicit ReadVariableNoCopyOp(tensorflow::OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("dtype", &dtype_));
  }

  void Compute(tensorflow::OpKernelContext* ctx) override {
    tensorflow::core::RefCountPtr<tensorflow::Var> variable;
    OP_REQUIRES_OK(ctx, tensorflow::LookupResource(ctx, tensorflow::HandleFromInput(ctx, 0),
                                                   &variable));
    tensorflow::tf_shared_lock lock(*variable->mu());
    const tensorflow::Tensor& value = *variable->tensor();
    OP_REQUIRES(ctx, variable->is_initialized && value.IsInitialized(),
                absl::FailedPreconditionError(
                    type_string() + ": the variable 'resource' is not initialized."));
    OP_REQUIRES(ctx, value.dtype() == dtype_,
                absl::InvalidArgumentError(type_string() + ": 'resource' holds " +
                                           tensorflow::DataTypeString(value.dtype()) +
                                           ", not 'dtype' " +
                                           tensorflow::DataTypeString(dtype_) + "."));
    ctx->set_output(0, value);  // shares the buffer: a reference count, no copy
  }

 private:
  tensorflow::DataType dtype_;
};

REGISTER_KERNEL_BUILDER(Name("DeReadVariableNoCopy").Device(tensorflow::DEVICE_CPU),
                        ReadVariableNoCopyOp);

#if GOOGLE_CUDA
// Device memory only: the handle itself lives on the host.
#define DE_REGISTER_GPU_READ(T)                                                          \
  REGISTER_KERNEL_BUILDER(                                                               \
      Name("DeReadVariableNoCopy").Device(tensorflow::DEVICE_GPU).HostMemory("resource") \
          .TypeConstraint<T>("dtype"),                                                   \
      ReadVariableNoCopyOp);
DE_REGISTER_GPU_READ(Eigen::half)
DE_REGISTER_GPU_READ(Eigen::bfloat16)
DE_REGISTER_GPU_READ(float)
DE_REGISTER_GPU_READ(double)
DE_REGISTER_GPU_READ(int64_t)
#undef DE_REGISTER_GPU_READ
#endif  // GOOGLE_CUDA

}  // namespace
}  // namespace distributed_embeddings
