// CPU functor and registration of DeIntegerLookup.
#include <cstring>

#include "embedding/ops/integer_lookup_kernels.h"

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

  static Status Lookup(OpKernelContext* ctx, int64_t* state, int64_t state_size,
                       int64_t max_tokens, const KeyT* keys, int64_t n, bool insert,
                       int64_t* ids) {
    return IntegerLookupCpu(state, state_size, max_tokens, keys, n, insert, ids,
                            CpuParallelFor(ctx));
  }
};

#define DE_REGISTER_CPU_INTEGER_LOOKUP(KeyT)                                         \
  REGISTER_KERNEL_BUILDER(Name("DeIntegerLookup")                                    \
                              .Device(tensorflow::DEVICE_CPU)                        \
                              .TypeConstraint<KeyT>("Tkeys"),                        \
                          IntegerLookupOp<CPUDevice, KeyT>);

DE_REGISTER_CPU_INTEGER_LOOKUP(int32_t)
DE_REGISTER_CPU_INTEGER_LOOKUP(int64_t)

#undef DE_REGISTER_CPU_INTEGER_LOOKUP

}  // namespace distributed_embeddings
