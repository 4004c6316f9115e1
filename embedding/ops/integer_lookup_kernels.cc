// CPU functor and registration of DeIntegerLookup.
#include "embedding/ops/integer_lookup_kernels.h"

#include <cstring>

namespace distributed_embeddings {

using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using CPUDevice = Eigen::ThreadPoolDevice;

template <typename KeyT>
struct IntegerLookupFunctor<CPUDevice, KeyT> {
  static Status Copy(OpKernelContext* ctx, const Tensor& from, Tensor* to) {
    std::memcpy(to->flat<int64_t>().data(), from.flat<int64_t>().data(),
                from.NumElements() * sizeof(int64_t));
    return Status::Ok();
  }

  static Status Lookup(OpKernelContext* ctx, int64_t* state, int64_t state_size, int64_t max_tokens,
                       const KeyT* keys, int64_t n, bool insert, int64_t* ids) {
    return IntegerLookupCpu(state, state_size, max_tokens, keys, n, insert, ids,
                            CpuParallelFor(ctx));
  }
};

class InitialIntegerLookupStateOp : public tensorflow::OpKernel {
 public:
  explicit InitialIntegerLookupStateOp(tensorflow::OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("max_tokens", &max_tokens_));
    OP_REQUIRES_OK(ctx, ToTfStatus(ValidateIntegerLookupStateSize(
                                       IntegerLookupStateSize(max_tokens_), max_tokens_),
                                   type_string()));
  }

  void Compute(OpKernelContext* ctx) override {
    Tensor* state = nullptr;
    OP_REQUIRES_OK(
        ctx, ctx->allocate_output(0, tensorflow::TensorShape({IntegerLookupStateSize(max_tokens_)}),
                                  &state));
    InitIntegerLookupState(state->flat<int64_t>().data(), max_tokens_);
  }

 private:
  int64_t max_tokens_ = 0;
};

REGISTER_KERNEL_BUILDER(Name("DeInitialIntegerLookupState").Device(tensorflow::DEVICE_CPU),
                        InitialIntegerLookupStateOp);

class ValidateIntegerLookupStateOp : public tensorflow::OpKernel {
 public:
  explicit ValidateIntegerLookupStateOp(tensorflow::OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("max_tokens", &max_tokens_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& state = ctx->input(0);
    OP_REQUIRES(ctx, state.dims() == 1,
                absl::InvalidArgumentError(type_string() + ": 'state' must be 1-D; got shape " +
                                           state.shape().DebugString() + "."));
    OP_REQUIRES_OK(ctx, ToTfStatus(ValidateIntegerLookupState(state.flat<int64_t>().data(),
                                                              state.NumElements(), max_tokens_),
                                   type_string()));
  }

 private:
  int64_t max_tokens_ = 0;
};

REGISTER_KERNEL_BUILDER(Name("DeValidateIntegerLookupState").Device(tensorflow::DEVICE_CPU),
                        ValidateIntegerLookupStateOp);

#define DE_REGISTER_CPU_INTEGER_LOOKUP(KeyT)                                                \
  REGISTER_KERNEL_BUILDER(                                                                  \
      Name("DeIntegerLookup").Device(tensorflow::DEVICE_CPU).TypeConstraint<KeyT>("Tkeys"), \
      IntegerLookupOp<CPUDevice, KeyT>);

DE_REGISTER_CPU_INTEGER_LOOKUP(int32_t)
DE_REGISTER_CPU_INTEGER_LOOKUP(int64_t)

#undef DE_REGISTER_CPU_INTEGER_LOOKUP

}  // namespace distributed_embeddings
