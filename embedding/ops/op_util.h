// Helpers every kernel of the op layer shares: status conversion, overflow-checked shapes,
// variable checks and the CPU thread pool as the kernel library's ParallelFor.
#ifndef DISTRIBUTED_EMBEDDINGS_EMBEDDING_OPS_OP_UTIL_H_
#define DISTRIBUTED_EMBEDDINGS_EMBEDDING_OPS_OP_UTIL_H_

#include <cstdint>
#include <initializer_list>
#include <string>

#include "embedding/kernels/parallel.h"
#include "embedding/kernels/status.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/resource_var.h"
#include "tensorflow/core/framework/tensor_shape.h"

namespace distributed_embeddings {

// Converts a kernel-library status, naming `op` in the message.
absl::Status ToTfStatus(const Status& status, const std::string& op);

// The shape `dims`, which come from inputs. TensorShape's constructor CHECK-fails (aborting the
// process) on a negative size or a product past INT64_MAX; this returns InvalidArgument naming
// `op` and `what` instead.
absl::Status MakeShape(const std::string& op, const std::string& what,
                       std::initializer_list<int64_t> dims, tensorflow::TensorShape* shape);

// With `variable`'s lock held: whether it is initialized and holds `dtype`, as an op reading it
// through its input named `input` needs.
absl::Status CheckVariableValue(const std::string& op, tensorflow::Var* variable,
                                tensorflow::DataType dtype, const std::string& input = "resource");

// With `variable`'s exclusive lock held, before a sparse update writes its buffer in place: what
// TensorFlow's own sparse updates do. Unless the variable is in copy-on-read mode already (its
// readers then copy), a buffer that somebody else still holds is copied first, so no earlier read
// sees the update; then the variable enters copy-on-read mode.
absl::Status PrepareForSparseUpdate(tensorflow::OpKernelContext* ctx, tensorflow::Var* variable);

// Splits kernel-library work across the op's intra-op thread pool.
ParallelFor CpuParallelFor(tensorflow::OpKernelContext* ctx);

}  // namespace distributed_embeddings

#endif  // DISTRIBUTED_EMBEDDINGS_EMBEDDING_OPS_OP_UTIL_H_
