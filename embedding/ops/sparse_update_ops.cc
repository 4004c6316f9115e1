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

}  // namespace distributed_embeddings
