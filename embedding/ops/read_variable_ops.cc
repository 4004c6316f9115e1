// DeReadVariableNoCopy: a resource variable's value without the copy TensorFlow's own read makes
// once the variable is in copy-on-read mode (the mode any sparse update leaves it in).
//
// The output shares the variable's buffer and still holds the value at the read: TensorFlow's
// update ops copy a buffer that anyone else holds before writing to it (a Python test checks).
// Weights export and dense reads of large tables are where the copy would be pure cost.
#include "embedding/ops/embedding_lookup_kernels.h"
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

value: shares the variable's buffer; later updates copy it first, so it keeps the value read.
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
    OP_REQUIRES_OK(ctx, CheckVariableValue(type_string(), variable.get(), dtype_));
    const tensorflow::Tensor& value = *variable->tensor();
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
