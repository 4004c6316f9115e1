#include "embedding/ops/op_util.h"

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
                                tensorflow::DataType dtype) {
  const tensorflow::Tensor& value = *variable->tensor();
  if (!variable->is_initialized || !value.IsInitialized()) {
    return absl::FailedPreconditionError(op + ": the variable 'resource' is not initialized.");
  }
  if (value.dtype() != dtype) {
    return absl::InvalidArgumentError(
        op + ": 'resource' must hold " + tensorflow::DataTypeString(dtype) +
        " to match 'dtype'; got " + tensorflow::DataTypeString(value.dtype()) + ".");
  }
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
