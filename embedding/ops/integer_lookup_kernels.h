// The TensorFlow kernel of DeIntegerLookup, shared by the CPU and GPU registrations.
//
// The vocabulary lives in a variable and is updated in place under the variable's exclusive lock
// (shared when only looking up). If a dense read still aliases the buffer, the kernel copies it
// first, as TensorFlow's own in-place updates do, so no reader ever sees it change.
#ifndef DISTRIBUTED_EMBEDDINGS_EMBEDDING_OPS_INTEGER_LOOKUP_KERNELS_H_
#define DISTRIBUTED_EMBEDDINGS_EMBEDDING_OPS_INTEGER_LOOKUP_KERNELS_H_

#include <string>

#include "embedding/kernels/integer_lookup.h"
#include "embedding/ops/op_util.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/resource_mgr.h"
#include "tensorflow/core/framework/resource_var.h"

namespace distributed_embeddings {

template <typename Device, typename KeyT>
struct IntegerLookupFunctor {
  // Copies `from` into the new buffer `to` (same shape).
  static Status Copy(tensorflow::OpKernelContext* ctx, const tensorflow::Tensor& from,
                     tensorflow::Tensor* to);
  static Status Lookup(tensorflow::OpKernelContext* ctx, int64_t* state, int64_t state_size,
                       int64_t max_tokens, const KeyT* keys, int64_t n, bool insert, int64_t* ids);
};

template <typename Device, typename KeyT>
class IntegerLookupOp : public tensorflow::OpKernel {
 public:
  explicit IntegerLookupOp(tensorflow::OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("max_tokens", &max_tokens_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("insert", &insert_));
  }

  void Compute(tensorflow::OpKernelContext* ctx) override {
    const tensorflow::Tensor& keys = ctx->input(1);
    tensorflow::Tensor* ids = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, keys.shape(), &ids));
    tensorflow::core::RefCountPtr<tensorflow::Var> variable;
    OP_REQUIRES_OK(ctx,
                   tensorflow::LookupResource(ctx, tensorflow::HandleFromInput(ctx, 0), &variable));
    if (insert_) {
      tensorflow::mutex_lock lock(*variable->mu());
      Run(ctx, variable.get(), keys, ids);
    } else {
      tensorflow::tf_shared_lock lock(*variable->mu());
      Run(ctx, variable.get(), keys, ids);
    }
  }

 private:
  void Run(tensorflow::OpKernelContext* ctx, tensorflow::Var* variable,
           const tensorflow::Tensor& keys, tensorflow::Tensor* ids) {
    tensorflow::Tensor* state = variable->tensor();
    OP_REQUIRES(ctx, variable->is_initialized && state->IsInitialized(),
                absl::FailedPreconditionError(type_string() +
                                              ": the variable 'state' is not initialized."));
    OP_REQUIRES(
        ctx, state->dtype() == tensorflow::DT_INT64 && state->dims() == 1,
        absl::InvalidArgumentError(type_string() + ": 'state' must be a 1-D int64 variable; got " +
                                   tensorflow::DataTypeString(state->dtype()) + " " +
                                   state->shape().DebugString() + "."));
    OP_REQUIRES_OK(ctx,
                   ToTfStatus(ValidateIntegerLookupStateSize(state->NumElements(), max_tokens_),
                              type_string()));
    if (insert_ && !state->RefCountIsOne()) {
      tensorflow::Tensor copy;
      OP_REQUIRES_OK(ctx, ctx->allocate_temp(tensorflow::DT_INT64, state->shape(), &copy));
      OP_REQUIRES_OK(ctx, ToTfStatus(IntegerLookupFunctor<Device, KeyT>::Copy(ctx, *state, &copy),
                                     type_string()));
      *state = copy;
    }
    OP_REQUIRES_OK(ctx, ToTfStatus(IntegerLookupFunctor<Device, KeyT>::Lookup(
                                       ctx, state->flat<int64_t>().data(), state->NumElements(),
                                       max_tokens_, keys.flat<KeyT>().data(), keys.NumElements(),
                                       insert_, ids->flat<int64_t>().data()),
                                   type_string()));
  }

  int64_t max_tokens_ = 0;
  bool insert_ = true;
};

}  // namespace distributed_embeddings

#endif  // DISTRIBUTED_EMBEDDINGS_EMBEDDING_OPS_INTEGER_LOOKUP_KERNELS_H_
