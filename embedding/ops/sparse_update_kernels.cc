// CPU kernels of the sparse optimizer update ops: every input checked up front, the variables
// locked exclusively (in address order, so two updates never deadlock), their buffers made ours
// as TensorFlow's own sparse updates do, then one call into the kernel library. The fused op
// (DeSparseApplyLookupGrad) takes the lookup's output gradient and ids instead of IndexedSlices.
#include <algorithm>
#include <array>
#include <memory>
#include <string>
#include <vector>

#include "embedding/kernels/sparse_update.h"
#include "embedding/ops/embedding_lookup_kernels.h"
#include "embedding/ops/op_util.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/resource_mgr.h"
#include "tensorflow/core/framework/resource_var.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_shape.h"

namespace distributed_embeddings {

using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShapeUtils;

namespace {

// The ops' inputs, in order, per rule: the variables, then (after indices and grad) the scalars.
struct RuleInputs {
  std::vector<std::string> variables;
  std::vector<std::string> scalars;
};

RuleInputs InputsOf(SparseRule rule) {
  switch (rule) {
    case SparseRule::kSgd:
      return {{"var"}, {"learning_rate"}};
    case SparseRule::kAdagrad:
    case SparseRule::kRowwiseAdagrad:
      return {{"var", "accumulator"}, {"learning_rate", "epsilon"}};
    case SparseRule::kLazyAdam:
      return {{"var", "m", "v"},
              {"learning_rate", "one_minus_beta1", "one_minus_beta2", "epsilon"}};
  }
  return {};
}

// Reads the step's hyperparameters from the scalar inputs `first`, `first + 1`, ... named by
// `inputs.scalars`.
template <typename T>
absl::Status ReadHyper(OpKernelContext* ctx, const std::string& op, SparseRule rule,
                       const RuleInputs& inputs, int first, SparseHyper<T>* hyper) {
  std::array<T, 4> scalars{};
  for (size_t s = 0; s < inputs.scalars.size(); ++s) {
    const Tensor& scalar = ctx->input(first + static_cast<int>(s));
    if (!TensorShapeUtils::IsScalar(scalar.shape())) {
      return absl::InvalidArgumentError(op + ": '" + inputs.scalars[s] +
                                        "' must be a scalar; got shape " +
                                        scalar.shape().DebugString() + ".");
    }
    scalars[s] = scalar.scalar<T>()();
  }
  hyper->learning_rate = scalars[0];
  if (rule == SparseRule::kLazyAdam) {
    hyper->one_minus_beta1 = scalars[1];
    hyper->one_minus_beta2 = scalars[2];
    hyper->epsilon = scalars[3];
  } else {
    hyper->epsilon = scalars[1];
  }
  return absl::OkStatus();
}

// A table's variable and its state's (inputs 0 .. n - 1), looked up and held under exclusive
// locks for as long as this lives: taken in address order, so lookups of the table (shared lock)
// never see a row half updated and concurrent updates of overlapping variables cannot deadlock.
// Acquire checks their dtypes and shapes and makes their buffers ours, as TensorFlow's own
// sparse updates do.
template <typename T>
class LockedSparseTable {
 public:
  absl::Status Acquire(OpKernelContext* ctx, const std::string& op, SparseRule rule,
                       const std::vector<std::string>& names) {
    const int num_vars = static_cast<int>(names.size());
    vars_.resize(num_vars);
    for (int i = 0; i < num_vars; ++i) {
      TF_RETURN_IF_ERROR(
          tensorflow::LookupResource(ctx, tensorflow::HandleFromInput(ctx, i), &vars_[i]));
    }
    for (int i = 0; i < num_vars; ++i) {
      for (int j = i + 1; j < num_vars; ++j) {
        if (vars_[i].get() == vars_[j].get()) {
          return absl::InvalidArgumentError(op + ": '" + names[i] + "' and '" + names[j] +
                                            "' must be different variables.");
        }
      }
    }
    std::vector<tensorflow::Var*> order;
    for (const auto& var : vars_) order.push_back(var.get());
    std::sort(order.begin(), order.end());
    for (tensorflow::Var* var : order) {
      locks_.push_back(std::make_unique<tensorflow::mutex_lock>(*var->mu()));
    }
    for (int i = 0; i < num_vars; ++i) {
      TF_RETURN_IF_ERROR(
          CheckVariableValue(op, vars_[i].get(), tensorflow::DataTypeToEnum<T>::v(), names[i]));
    }
    const Tensor& weights = *vars_[0]->tensor();
    if (!TensorShapeUtils::IsMatrix(weights.shape())) {
      return absl::InvalidArgumentError(op + ": 'var' must be a 2-D table; got shape " +
                                        weights.shape().DebugString() + ".");
    }
    const int64_t num_rows = weights.dim_size(0);
    const bool per_row = SparseRuleSlotsPerRow(rule);
    for (int i = 1; i < num_vars; ++i) {
      const tensorflow::TensorShape& shape = vars_[i]->tensor()->shape();
      const bool ok = per_row ? (shape == tensorflow::TensorShape({num_rows}) ||
                                 shape == tensorflow::TensorShape({num_rows, 1}))
                              : shape == weights.shape();
      if (!ok) {
        const std::string rows = std::to_string(num_rows);
        return absl::InvalidArgumentError(
            op + ": '" + names[i] + "' must have shape " +
            (per_row ? "[" + rows + "] or [" + rows + ", 1]" : weights.shape().DebugString()) +
            " (one value per " + (per_row ? "row" : "element") + " of 'var'); got " +
            shape.DebugString() + ".");
      }
    }
    for (const auto& var : vars_) TF_RETURN_IF_ERROR(PrepareForSparseUpdate(ctx, var.get()));
    table_.weights = vars_[0]->tensor()->template flat<T>().data();
    table_.num_rows = num_rows;
    table_.width = weights.dim_size(1);
    for (int i = 1; i < num_vars; ++i) {
      table_.slots[i - 1] = vars_[i]->tensor()->template flat<T>().data();
    }
    return absl::OkStatus();
  }

  const SparseTable<T>& table() const { return table_; }

 private:
  std::vector<tensorflow::core::RefCountPtr<tensorflow::Var>> vars_;
  std::vector<std::unique_ptr<tensorflow::mutex_lock>> locks_;
  SparseTable<T> table_;
};

absl::Status WidthMismatch(const std::string& op, int64_t width, const Tensor& grad) {
  return absl::InvalidArgumentError(op + ": 'grad' must have the table's width " +
                                    std::to_string(width) + "; got shape " +
                                    grad.shape().DebugString() + ".");
}

template <typename T, typename IdT, SparseRule kRule>
class SparseApplyOp : public tensorflow::OpKernel {
 public:
  explicit SparseApplyOp(tensorflow::OpKernelConstruction* ctx)
      : OpKernel(ctx), inputs_(InputsOf(kRule)) {}

  void Compute(OpKernelContext* ctx) override {
    const std::string& op = type_string();
    const int num_vars = static_cast<int>(inputs_.variables.size());
    const Tensor& indices = ctx->input(num_vars);
    const Tensor& grad = ctx->input(num_vars + 1);
    OP_REQUIRES(ctx, TensorShapeUtils::IsVector(indices.shape()),
                absl::InvalidArgumentError(op + ": 'indices' must be 1-D; got shape " +
                                           indices.shape().DebugString() + "."));
    OP_REQUIRES(
        ctx, TensorShapeUtils::IsMatrix(grad.shape()) && grad.dim_size(0) == indices.NumElements(),
        absl::InvalidArgumentError(op + ": 'grad' must be [len(indices), width] = [" +
                                   std::to_string(indices.NumElements()) + ", width]; got shape " +
                                   grad.shape().DebugString() + "."));
    SparseHyper<T> hyper;
    OP_REQUIRES_OK(ctx, ReadHyper(ctx, op, kRule, inputs_, num_vars + 2, &hyper));
    LockedSparseTable<T> locked;
    OP_REQUIRES_OK(ctx, locked.Acquire(ctx, op, kRule, inputs_.variables));
    const SparseTable<T>& table = locked.table();
    OP_REQUIRES(ctx, grad.dim_size(1) == table.width, WidthMismatch(op, table.width, grad));
    OP_REQUIRES_OK(ctx, ToTfStatus(SparseUpdateCpu(kRule, hyper, table, indices.flat<IdT>().data(),
                                                   indices.NumElements(), grad.flat<T>().data(),
                                                   CpuParallelFor(ctx)),
                                   op));
  }

 private:
  const RuleInputs inputs_;
};

absl::Status ParseRule(const std::string& name, SparseRule* rule) {
  if (name == "sgd") {
    *rule = SparseRule::kSgd;
  } else if (name == "adagrad") {
    *rule = SparseRule::kAdagrad;
  } else if (name == "rowwise_adagrad") {
    *rule = SparseRule::kRowwiseAdagrad;
  } else if (name == "lazy_adam") {
    *rule = SparseRule::kLazyAdam;
  } else {
    return absl::InvalidArgumentError("unknown rule '" + name + "'.");
  }
  return absl::OkStatus();
}

// DeSparseApplyLookupGrad: the lookup's backward and the rule's update in one call.
template <typename T, typename IdT, typename OffsetT>
class LookupGradSparseApplyOp : public tensorflow::OpKernel {
 public:
  explicit LookupGradSparseApplyOp(tensorflow::OpKernelConstruction* ctx) : OpKernel(ctx) {
    std::string rule;
    OP_REQUIRES_OK(ctx, ctx->GetAttr("rule", &rule));
    OP_REQUIRES_OK(ctx, ParseRule(rule, &rule_));
    inputs_ = InputsOf(rule_);
    OP_REQUIRES_OK(ctx, ReadLookupAttrs(ctx, &combiner_, &bounds_check_));
    int num_vars = 0;
    OP_REQUIRES_OK(ctx, ctx->GetAttr("num_vars", &num_vars));
    OP_REQUIRES(ctx, num_vars == static_cast<int>(inputs_.variables.size()),
                absl::InvalidArgumentError(type_string() + ": rule '" + rule + "' takes " +
                                           std::to_string(inputs_.variables.size()) +
                                           " variables (the table, then its state); got " +
                                           std::to_string(num_vars) + "."));
    int num_hyper = 0;
    OP_REQUIRES_OK(ctx, ctx->GetAttr("num_hyper", &num_hyper));
    OP_REQUIRES(
        ctx, num_hyper == static_cast<int>(inputs_.scalars.size()),
        absl::InvalidArgumentError(type_string() + ": rule '" + rule + "' takes " +
                                   std::to_string(inputs_.scalars.size()) +
                                   " hyperparameters; got " + std::to_string(num_hyper) + "."));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("num_weights", &num_weights_));
    OP_REQUIRES(
        ctx, num_weights_ == 0 || num_weights_ == 1,
        absl::InvalidArgumentError(type_string() + ": 'weights' holds one tensor or none; got " +
                                   std::to_string(num_weights_) + "."));
  }

  void Compute(OpKernelContext* ctx) override {
    const std::string& op = type_string();
    const int first = static_cast<int>(inputs_.variables.size());
    const Tensor& grad = ctx->input(first);
    const Tensor& ids = ctx->input(first + 1);
    const Tensor& row_splits = ctx->input(first + 2);
    const Tensor& num_rows = ctx->input(first + 3);
    OP_REQUIRES_OK(ctx, CheckCsrInputs(op, ids, row_splits));
    OP_REQUIRES_OK(ctx, CheckGradInputs(op, grad, row_splits, num_rows));
    const T* weights = nullptr;
    if (num_weights_ == 1) {
      OP_REQUIRES_OK(ctx, CheckWeights(op, ctx->input(first + 4), ids));
      weights = ctx->input(first + 4).flat<T>().data();
    }
    SparseHyper<T> hyper;
    OP_REQUIRES_OK(ctx, ReadHyper(ctx, op, rule_, inputs_, first + 4 + num_weights_, &hyper));
    LockedSparseTable<T> locked;
    OP_REQUIRES_OK(ctx, locked.Acquire(ctx, op, rule_, inputs_.variables));
    const SparseTable<T>& table = locked.table();
    OP_REQUIRES(ctx, grad.dim_size(1) == table.width, WidthMismatch(op, table.width, grad));
    // The lookup's table must be this variable: its rows are what the ids were checked against.
    OP_REQUIRES(ctx, num_rows.scalar<int64_t>()() == table.num_rows,
                absl::InvalidArgumentError(op + ": 'num_rows' must be the table's " +
                                           std::to_string(table.num_rows) + " rows; got " +
                                           std::to_string(num_rows.scalar<int64_t>()()) + "."));
    OP_REQUIRES_OK(ctx, ToTfStatus(LookupGradSparseUpdateCpu(
                                       rule_, hyper, table, grad.flat<T>().data(),
                                       CsrFromTensors<IdT, OffsetT>(ids, row_splits), weights,
                                       combiner_, bounds_check_, CpuParallelFor(ctx)),
                                   op));
  }

 private:
  SparseRule rule_ = SparseRule::kSgd;
  RuleInputs inputs_;
  Combiner combiner_ = Combiner::kSum;
  BoundsCheck bounds_check_ = BoundsCheck::kError;
  int num_weights_ = 0;
};

#define DE_REGISTER_SPARSE_APPLY(NAME, RULE, T, IdT)            \
  REGISTER_KERNEL_BUILDER(Name(NAME)                            \
                              .Device(tensorflow::DEVICE_CPU)   \
                              .TypeConstraint<T>("T")           \
                              .TypeConstraint<IdT>("Tindices"), \
                          SparseApplyOp<T, IdT, SparseRule::RULE>);
#define DE_REGISTER_SPARSE_APPLY_TYPES(NAME, RULE)      \
  DE_REGISTER_SPARSE_APPLY(NAME, RULE, float, int32_t)  \
  DE_REGISTER_SPARSE_APPLY(NAME, RULE, float, int64_t)  \
  DE_REGISTER_SPARSE_APPLY(NAME, RULE, double, int32_t) \
  DE_REGISTER_SPARSE_APPLY(NAME, RULE, double, int64_t)

DE_REGISTER_SPARSE_APPLY_TYPES("DeSparseApplySgd", kSgd)
DE_REGISTER_SPARSE_APPLY_TYPES("DeSparseApplyAdagrad", kAdagrad)
DE_REGISTER_SPARSE_APPLY_TYPES("DeSparseApplyRowwiseAdagrad", kRowwiseAdagrad)
DE_REGISTER_SPARSE_APPLY_TYPES("DeSparseApplyLazyAdam", kLazyAdam)

#undef DE_REGISTER_SPARSE_APPLY_TYPES
#undef DE_REGISTER_SPARSE_APPLY

#define DE_REGISTER_LOOKUP_GRAD_APPLY(T, IdT, OffsetT)             \
  REGISTER_KERNEL_BUILDER(Name("DeSparseApplyLookupGrad")          \
                              .Device(tensorflow::DEVICE_CPU)      \
                              .TypeConstraint<T>("T")              \
                              .TypeConstraint<IdT>("Tindices")     \
                              .TypeConstraint<OffsetT>("Tsplits"), \
                          LookupGradSparseApplyOp<T, IdT, OffsetT>);
#define DE_REGISTER_LOOKUP_GRAD_APPLY_TYPES(T)       \
  DE_REGISTER_LOOKUP_GRAD_APPLY(T, int32_t, int32_t) \
  DE_REGISTER_LOOKUP_GRAD_APPLY(T, int32_t, int64_t) \
  DE_REGISTER_LOOKUP_GRAD_APPLY(T, int64_t, int32_t) \
  DE_REGISTER_LOOKUP_GRAD_APPLY(T, int64_t, int64_t)
DE_REGISTER_LOOKUP_GRAD_APPLY_TYPES(float)
DE_REGISTER_LOOKUP_GRAD_APPLY_TYPES(double)
#undef DE_REGISTER_LOOKUP_GRAD_APPLY_TYPES
#undef DE_REGISTER_LOOKUP_GRAD_APPLY

}  // namespace
}  // namespace distributed_embeddings
