#include "embedding/ops/op_util.h"

#include <cstring>

#include "tensorflow/core/util/work_sharder.h"

namespace distributed_embeddings {

absl::Status ToTfStatus(const Status& status, const std::string& op) {
  switch (status.code()) {
    case Status::Code::kOk:
      return absl::OkStatus();
    case Status::Code::kInvalidArgument:
      return absl::InvalidArgumentError(op + ": " + status.message());
    case Status::Code::kResourceExhausted:
      return absl::ResourceExhaustedError(op + ": " + status.message());
    case Status::Code::kInternal:
      break;
  }
  return absl::InternalError(op + ": " + status.message());
}

absl::Status MakeShape(const std::string& op, const std::string& what,
                       std::initializer_list<int64_t> dims, tensorflow::TensorShape* shape) {
  const absl::Status built = tensorflow::TensorShape::BuildTensorShape(dims, shape);
  if (built.ok()) return built;
  std::string sizes;
  for (const int64_t dim : dims) sizes += (sizes.empty() ? "" : ", ") + std::to_string(dim);
  return absl::InvalidArgumentError(op + ": " + what + " would have shape [" + sizes +
                                    "], which is not a valid tensor shape (" +
                                    std::string(built.message()) + ").");
}

absl::Status CheckVariableValue(const std::string& op, tensorflow::Var* variable,
                                tensorflow::DataType dtype, const std::string& input) {
  const tensorflow::Tensor& value = *variable->tensor();
  if (!variable->is_initialized || !value.IsInitialized()) {
    return absl::FailedPreconditionError(op + ": the variable '" + input + "' is not initialized.");
  }
  if (value.dtype() != dtype) {
    return absl::InvalidArgumentError(op + ": '" + input + "' must hold " +
                                      tensorflow::DataTypeString(dtype) + "; got " +
                                      tensorflow::DataTypeString(value.dtype()) + ".");
  }
  return absl::OkStatus();
}

absl::Status PrepareForSparseUpdate(tensorflow::OpKernelContext* ctx, tensorflow::Var* variable) {
  if (variable->copy_on_read_mode.load()) return absl::OkStatus();
  tensorflow::Tensor* value = variable->tensor();
  if (!value->RefCountIsOne()) {
    tensorflow::Tensor copy;
    TF_RETURN_IF_ERROR(ctx->allocate_temp(value->dtype(), value->shape(), &copy));
    const auto source = value->tensor_data();
    std::memcpy(const_cast<char*>(copy.tensor_data().data()), source.data(), source.size());
    *value = copy;
  }
  variable->copy_on_read_mode.store(true);
  return absl::OkStatus();
}

ParallelFor CpuParallelFor(tensorflow::OpKernelContext* ctx) {
  const auto* workers = ctx->device()->tensorflow_cpu_worker_threads();
  return [workers](int64_t total, int64_t cost_per_unit,
                   const std::function<void(int64_t, int64_t)>& work) {
    tensorflow::Shard(workers->num_threads, workers->workers, total, cost_per_unit, work);
  };
}

}  // namespace distributed_embeddings
