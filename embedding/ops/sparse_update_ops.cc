// Op definitions for the sparse optimizer updates: one op per rule, as TensorFlow's own
// ResourceSparseApply* ops. Each takes the table's resource variable and its state's, the
// gradient as IndexedSlices hold it (indices and one row per index), and the step's
// hyperparameters as scalars, so a learning-rate schedule needs no retracing.
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace distributed_embeddings {

using ::tensorflow::shape_inference::InferenceContext;
using ::tensorflow::shape_inference::ShapeHandle;

namespace {

// Inputs: `variables` resources, indices, grad, then `scalars` hyperparameters.
absl::Status SparseApplyShape(InferenceContext* c, int variables, int scalars) {
  ShapeHandle unused;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(variables), 1, &unused));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(variables + 1), 2, &unused));
  for (int s = 0; s < scalars; ++s) {
    TF_RETURN_IF_ERROR(c->WithRank(c->input(variables + 2 + s), 0, &unused));
  }
  return absl::OkStatus();
}

}  // namespace

REGISTER_OP("DeSparseApplySgd")
    .Input("var: resource")
    .Input("indices: Tindices")
    .Input("grad: T")
    .Input("learning_rate: T")
    .Attr("T: {float, double}")
    .Attr("Tindices: {int32, int64}")
    .SetShapeFn([](InferenceContext* c) { return SparseApplyShape(c, 1, 1); })
    .Doc(R"doc(
var[i] -= grad_i * learning_rate for each distinct index i, grad_i the sum of its rows of `grad`.

var: [num_rows, width] table, updated in place under its exclusive lock.
indices: [n] rows of `var`, each in [0, num_rows); repeats allowed.
grad: [n, width].
)doc");

REGISTER_OP("DeSparseApplyAdagrad")
    .Input("var: resource")
    .Input("accumulator: resource")
    .Input("indices: Tindices")
    .Input("grad: T")
    .Input("learning_rate: T")
    .Input("epsilon: T")
    .Attr("T: {float, double}")
    .Attr("Tindices: {int32, int64}")
    .SetShapeFn([](InferenceContext* c) { return SparseApplyShape(c, 2, 2); })
    .Doc(R"doc(
Keras's Adagrad on the rows `indices` name: a += g * g; var -= (learning_rate * g) / sqrt(a + epsilon).

accumulator: the same shape as `var`.
)doc");

REGISTER_OP("DeSparseApplyRowwiseAdagrad")
    .Input("var: resource")
    .Input("accumulator: resource")
    .Input("indices: Tindices")
    .Input("grad: T")
    .Input("learning_rate: T")
    .Input("epsilon: T")
    .Attr("T: {float, double}")
    .Attr("Tindices: {int32, int64}")
    .SetShapeFn([](InferenceContext* c) { return SparseApplyShape(c, 2, 2); })
    .Doc(R"doc(
Row-wise Adagrad: a[i] += mean(g * g); var[i] -= (learning_rate * g) / sqrt(a[i] + epsilon).

accumulator: [num_rows] or [num_rows, 1], one value per row of `var`.
)doc");

REGISTER_OP("DeSparseApplyLazyAdam")
    .Input("var: resource")
    .Input("m: resource")
    .Input("v: resource")
    .Input("indices: Tindices")
    .Input("grad: T")
    .Input("learning_rate: T")
    .Input("one_minus_beta1: T")
    .Input("one_minus_beta2: T")
    .Input("epsilon: T")
    .Attr("T: {float, double}")
    .Attr("Tindices: {int32, int64}")
    .SetShapeFn([](InferenceContext* c) { return SparseApplyShape(c, 3, 4); })
    .Doc(R"doc(
Lazy Adam on the rows `indices` name (rows without gradient keep their moments):
m += (g - m) * one_minus_beta1; v += (g * g - v) * one_minus_beta2;
var -= (m * learning_rate) / (sqrt(v) + epsilon).

m, v: the same shape as `var`.
learning_rate: the step's bias-corrected rate, lr * sqrt(1 - beta2^t) / (1 - beta1^t).
)doc");

REGISTER_OP("DeSparseApplyLookupGrad")
    .Input("vars: num_vars * resource")
    .Input("grad: T")
    .Input("ids: Tindices")
    .Input("row_splits: Tsplits")
    .Input("num_rows: int64")
    .Input("weights: num_weights * T")
    .Input("hyper: num_hyper * T")
    .Attr("rule: {'sgd', 'adagrad', 'rowwise_adagrad', 'lazy_adam'}")
    .Attr("num_vars: int >= 1")
    .Attr("num_weights: int >= 0 = 0")
    .Attr("num_hyper: int >= 1")
    .Attr("T: {float, double}")
    .Attr("Tindices: {int32, int64}")
    .Attr("Tsplits: {int32, int64}")
    .Attr("combiner: {'sum', 'mean', 'sqrtn'}")
    .Attr("bounds_check: {'error', 'skip'} = 'error'")
    .SetShapeFn([](InferenceContext* c) {
      int num_vars = 0, num_weights = 0, num_hyper = 0;
      TF_RETURN_IF_ERROR(c->GetAttr("num_vars", &num_vars));
      TF_RETURN_IF_ERROR(c->GetAttr("num_weights", &num_weights));
      TF_RETURN_IF_ERROR(c->GetAttr("num_hyper", &num_hyper));
      ShapeHandle unused;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(num_vars), 2, &unused));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(num_vars + 1), 1, &unused));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(num_vars + 2), 1, &unused));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(num_vars + 3), 0, &unused));
      for (int i = 0; i < num_weights; ++i) {
        TF_RETURN_IF_ERROR(c->WithRank(c->input(num_vars + 4 + i), 1, &unused));
      }
      for (int i = 0; i < num_hyper; ++i) {
        TF_RETURN_IF_ERROR(c->WithRank(c->input(num_vars + 4 + num_weights + i), 0, &unused));
      }
      return absl::OkStatus();
    })
    .Doc(R"doc(
A pooled lookup's backward and a sparse optimizer update in one pass: the gradient `grad` of the
lookup of bags (ids, row_splits, weights) from `vars[0]` is summed per distinct id, as
DePooledEmbeddingLookupGrad (DeWeightedPooledEmbeddingLookupGrad) sums it, and applied by `rule`
(the rules of DeSparseApply*) without being written out. The variables end where the gradient op
followed by the DeSparseApply* op would put them, bit for bit.

vars: the table [num_rows, width], then the rule's state, as the DeSparseApply* op of `rule` takes
  them; all updated in place under their exclusive locks.
grad: [batch, width], the gradient of the lookup's output.
num_rows: the looked-up table's rows; must be the rows of vars[0].
weights: none, or one weight per id.
hyper: the DeSparseApply* op's scalars, in its order (sgd: learning_rate; adagrad, rowwise_adagrad:
  learning_rate, epsilon; lazy_adam: learning_rate, one_minus_beta1, one_minus_beta2, epsilon).
)doc");

}  // namespace distributed_embeddings
