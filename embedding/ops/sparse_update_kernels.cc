// CPU kernels of the sparse optimizer update ops: every input checked up front, the variables
// locked exclusively (in address order, so two updates never deadlock), their buffers made ours
// as TensorFlow's own sparse updates do, then one call into the kernel library.
#include <algorithm>
#include <array>
#include <memory>
#include <string>
#include <vector>

#include "embedding/kernels/sparse_update.h"
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
    std::array<T, 4> scalars{};
    for (size_t s = 0; s < inputs_.scalars.size(); ++s) {
      const Tensor& scalar = ctx->input(num_vars + 2 + static_cast<int>(s));
      OP_REQUIRES(ctx, TensorShapeUtils::IsScalar(scalar.shape()),
                  absl::InvalidArgumentError(op + ": '" + inputs_.scalars[s] +
                                             "' must be a scalar; got shape " +
                                             scalar.shape().DebugString() + "."));
      scalars[s] = scalar.scalar<T>()();
    }
    SparseHyper<T> hyper;
    hyper.learning_rate = scalars[0];
    if (kRule == SparseRule::kLazyAdam) {
      hyper.one_minus_beta1 = scalars[1];
      hyper.one_minus_beta2 = scalars[2];
      hyper.epsilon = scalars[3];
    } else {
      hyper.epsilon = scalars[1];
    }

    std::vector<tensorflow::core::RefCountPtr<tensorflow::Var>> vars(num_vars);
    for (int i = 0; i < num_vars; ++i) {
      OP_REQUIRES_OK(
          ctx, tensorflow::LookupResource(ctx, tensorflow::HandleFromInput(ctx, i), &vars[i]));
    }
    for (int i = 0; i < num_vars; ++i) {
      for (int j = i + 1; j < num_vars; ++j) {
        OP_REQUIRES(
            ctx, vars[i].get() != vars[j].get(),
            absl::InvalidArgumentError(op + ": '" + inputs_.variables[i] + "' and '" +
                                       inputs_.variables[j] + "' must be different variables."));
      }
    }
    // Exclusive locks, in address order: lookups of the table (shared lock) never see a row half
    // updated, and concurrent updates of overlapping variables cannot deadlock.
    std::vector<tensorflow::Var*> order;
    for (const auto& var : vars) order.push_back(var.get());
    std::sort(order.begin(), order.end());
    std::vector<std::unique_ptr<tensorflow::mutex_lock>> locks;
    for (tensorflow::Var* var : order) {
      locks.push_back(std::make_unique<tensorflow::mutex_lock>(*var->mu()));
    }
    for (int i = 0; i < num_vars; ++i) {
      OP_REQUIRES_OK(ctx, CheckVariableValue(op, vars[i].get(), tensorflow::DataTypeToEnum<T>::v(),
                                             inputs_.variables[i]));
    }
    const Tensor& weights = *vars[0]->tensor();
    OP_REQUIRES(ctx, TensorShapeUtils::IsMatrix(weights.shape()),
                absl::InvalidArgumentError(op + ": 'var' must be a 2-D table; got shape " +
                                           weights.shape().DebugString() + "."));
    const int64_t num_rows = weights.dim_size(0), width = weights.dim_size(1);
    OP_REQUIRES(ctx, grad.dim_size(1) == width,
                absl::InvalidArgumentError(op + ": 'grad' must have the table's width " +
                                           std::to_string(width) + "; got shape " +
                                           grad.shape().DebugString() + "."));
    for (int i = 1; i < num_vars; ++i) {
      const tensorflow::TensorShape& shape = vars[i]->tensor()->shape();
      const bool ok = SparseRuleSlotsPerRow(kRule)
                          ? (shape == tensorflow::TensorShape({num_rows}) ||
                             shape == tensorflow::TensorShape({num_rows, 1}))
                          : shape == weights.shape();
      OP_REQUIRES(ctx, ok,
                  absl::InvalidArgumentError(
                      op + ": '" + inputs_.variables[i] + "' must have shape " +
                      (SparseRuleSlotsPerRow(kRule) ? "[" + std::to_string(num_rows) + "] or [" +
                                                          std::to_string(num_rows) + ", 1]"
                                                    : weights.shape().DebugString()) +
                      " (one value per " + (SparseRuleSlotsPerRow(kRule) ? "row" : "element") +
                      " of 'var'); got " + shape.DebugString() + "."));
    }
    for (const auto& var : vars) OP_REQUIRES_OK(ctx, PrepareForSparseUpdate(ctx, var.get()));

    SparseTable<T> table;
    table.weights = vars[0]->tensor()->flat<T>().data();
    table.num_rows = num_rows;
    table.width = width;
    for (int i = 1; i < num_vars; ++i) table.slots[i - 1] = vars[i]->tensor()->flat<T>().data();
    OP_REQUIRES_OK(ctx, ToTfStatus(SparseUpdateCpu(kRule, hyper, table, indices.flat<IdT>().data(),
                                                   indices.NumElements(), grad.flat<T>().data(),
                                                   CpuParallelFor(ctx)),
                                   op));
  }

 private:
  const RuleInputs inputs_;
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

}  // namespace
}  // namespace distributed_embeddings
