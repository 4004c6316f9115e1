// DeReadVariableNoCopy: a resource variable's value without the copy TensorFlow's own read makes
// once the variable is in copy-on-read mode (the mode any sparse update leaves it in).
//
// The output shares the variable's buffer and keeps the value at the read. Dense updates copy a
// buffer that someone else holds before writing it. Sparse updates do so only when the variable
// is not in copy-on-read mode: in that mode TF assumes no reader holds the buffer and writes it
// in place. So the read leaves copy-on-read mode (under the variable's exclusive lock); the next
// sparse update then copies the buffer once if this value is still alive, and re-enters the mode.
// Weights export and dense reads of large tables are where a copy per read would be pure cost.
#include "embedding/ops/op_util.h"
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

value: shares the variable's buffer; later updates, dense or sparse, copy it before writing, so
  it keeps the value read.
)doc");

namespace {

class ReadVariableNoCopyOp : public tensorflow::OpKernel {
 public:
  explicit ReadVariableNoCopyOp(tensorflow::OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("dtype", &dtype_));
  }

  void Compute(tensorflow::OpKernelContext* ctx) override {
    tensorflow::core::RefCountPtr<tensorflow::Var> variable;
    OP_REQUIRES_OK(ctx,
                   tensorflow::LookupResource(ctx, tensorflow::HandleFromInput(ctx, 0), &variable));
    // Exclusive: no sparse update may be writing the buffer in place while the mode changes.
    tensorflow::mutex_lock lock(*variable->mu());
    OP_REQUIRES_OK(ctx, CheckVariableValue(type_string(), variable.get(), dtype_));
    variable->copy_on_read_mode.store(false);
    ctx->set_output(0, *variable->tensor());  // shares the buffer: a reference count, no copy
  }

 private:
  tensorflow::DataType dtype_;
};

REGISTER_KERNEL_BUILDER(Name("DeReadVariableNoCopy").Device(tensorflow::DEVICE_CPU),
                        ReadVariableNoCopyOp);

#if GOOGLE_CUDA
// Device memory only: the handle itself lives on the host.
#define DE_REGISTER_GPU_READ(T)                               \
  REGISTER_KERNEL_BUILDER(Name("DeReadVariableNoCopy")        \
                              .Device(tensorflow::DEVICE_GPU) \
                              .HostMemory("resource")         \
                              .TypeConstraint<T>("dtype"),    \
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
