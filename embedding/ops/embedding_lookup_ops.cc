// Op definitions and shape functions for pooled embedding lookups.
//
// The lookup comes in two flavours: DePooledEmbeddingLookup takes the table as a tensor, and
// DeResourcePooledEmbeddingLookup takes a resource variable's handle and reads its buffer in place
// under the variable's shared lock (a dense read of a variable in copy-on-read mode, the mode any
// sparse update leaves it in, would copy the whole table on every step).
#include <limits>

#include "tensorflow/core/framework/common_shape_fns.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace distributed_embeddings {

using ::tensorflow::shape_inference::DimensionHandle;
using ::tensorflow::shape_inference::InferenceContext;
using ::tensorflow::shape_inference::ShapeHandle;

namespace {

// Output [batch, width], batch = len(row_splits) - 1, once ids and row_splits are checked 1-D.
absl::Status PooledOutputShape(InferenceContext* c, DimensionHandle width) {
  ShapeHandle ids, row_splits;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 1, &ids));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 1, &row_splits));
  DimensionHandle batch;
  TF_RETURN_IF_ERROR(c->Subtract(c->Dim(row_splits, 0), 1, &batch));
  c->set_output(0, c->Matrix(batch, width));
  return absl::OkStatus();
}

absl::Status LookupShape(InferenceContext* c) {
  ShapeHandle params;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 2, &params));
  return PooledOutputShape(c, c->Dim(params, 1));
}

absl::Status ResourceLookupShape(InferenceContext* c) {
  DimensionHandle width = c->UnknownDim();
  const auto* handle_data = c->input_handle_shapes_and_types(0);
  if (handle_data != nullptr && !handle_data->empty()) {
    ShapeHandle params;
    TF_RETURN_IF_ERROR(c->WithRank((*handle_data)[0].shape, 2, &params));
    width = c->Dim(params, 1);
  }
  return PooledOutputShape(c, width);
}

absl::Status LookupGradShape(InferenceContext* c) {
  ShapeHandle grad, ids, row_splits, num_rows;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 2, &grad));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 1, &ids));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 1, &row_splits));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(3), 0, &num_rows));
  DimensionHandle num_unique = c->UnknownDim();
  c->set_output(0, c->Vector(num_unique));
  c->set_output(1, c->Matrix(num_unique, c->Dim(grad, 1)));
  return absl::OkStatus();
}

}  // namespace

REGISTER_OP("DePooledEmbeddingLookup")
    .Input("params: T")
    .Input("ids: Tindices")
    .Input("row_splits: Tsplits")
    .Output("output: Tout")
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("Tout: {half, bfloat16, float, double} = DT_FLOAT")
    .Attr("Tindices: {int32, int64}")
    .Attr("Tsplits: {int32, int64}")
    .Attr("combiner: {'sum', 'mean', 'sqrtn'}")
    .Attr("bounds_check: {'error', 'skip'} = 'error'")
    .SetShapeFn(LookupShape)
    .Doc(R"doc(
Sums or averages rows of `params` over bags of ids given in CSR form.

params: [num_rows, width] table.
ids: the ids of all bags, concatenated.
row_splits: [batch + 1]; bag b holds ids[row_splits[b]:row_splits[b + 1]].
output: [batch, width]; an empty bag gives zeros.
Tout: the output's dtype: T, or float for a half or bfloat16 table (summed in float, rounded once).
combiner: 'sum', 'mean' or 'sqrtn' (the sum over the square root of the bag's length).
bounds_check: 'error' rejects ids outside [0, num_rows); 'skip' ignores them.
)doc");

REGISTER_OP("DeResourcePooledEmbeddingLookup")
    .Input("resource: resource")
    .Input("ids: Tindices")
    .Input("row_splits: Tsplits")
    .Output("output: Tout")
    .Attr("dtype: {half, bfloat16, float, double}")
    .Attr("Tout: {half, bfloat16, float, double} = DT_FLOAT")
    .Attr("Tindices: {int32, int64}")
    .Attr("Tsplits: {int32, int64}")
    .Attr("combiner: {'sum', 'mean', 'sqrtn'}")
    .Attr("bounds_check: {'error', 'skip'} = 'error'")
    .SetShapeFn(ResourceLookupShape)
    .Doc(R"doc(
DePooledEmbeddingLookup on a resource variable, read in place without copying the table.
)doc");

REGISTER_OP("DePooledEmbeddingLookupGrad")
    .Input("grad: Tout")
    .Input("ids: Tindices")
    .Input("row_splits: Tsplits")
    .Input("num_rows: int64")
    .Output("unique_ids: Tindices")
    .Output("unique_grad: T")
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("Tout: {half, bfloat16, float, double} = DT_FLOAT")
    .Attr("Tindices: {int32, int64}")
    .Attr("Tsplits: {int32, int64}")
    .Attr("combiner: {'sum', 'mean', 'sqrtn'}")
    .Attr("bounds_check: {'error', 'skip'} = 'error'")
    .SetShapeFn(LookupGradShape)
    .Doc(R"doc(
The sparse gradient of a pooled lookup: each distinct id with its summed gradient row.

grad: [batch, width], the gradient of the lookup's output (of the lookup's Tout).
num_rows: the number of rows of the table, for the bounds check.
unique_ids: the distinct ids, each once.
unique_grad: [num_unique, width], of the table's dtype T.
)doc");

REGISTER_OP("DeWeightedPooledEmbeddingLookup")
    .Input("params: T")
    .Input("ids: Tindices")
    .Input("row_splits: Tsplits")
    .Input("weights: Tout")
    .Output("output: Tout")
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("Tout: {half, bfloat16, float, double} = DT_FLOAT")
    .Attr("Tindices: {int32, int64}")
    .Attr("Tsplits: {int32, int64}")
    .Attr("combiner: {'sum', 'mean', 'sqrtn'}")
    .Attr("bounds_check: {'error', 'skip'} = 'error'")
    .SetShapeFn(LookupShape)
    .Doc(R"doc(
DePooledEmbeddingLookup of weighted bags: sum(w * row), divided by sum(w) for 'mean' and by
sqrt(sum(w * w)) for 'sqrtn'; a bag whose divisor is zero gives zeros.

weights: one weight per id, aligned with ids.
)doc");

REGISTER_OP("DeResourceWeightedPooledEmbeddingLookup")
    .Input("resource: resource")
    .Input("ids: Tindices")
    .Input("row_splits: Tsplits")
    .Input("weights: Tout")
    .Output("output: Tout")
    .Attr("dtype: {half, bfloat16, float, double}")
    .Attr("Tout: {half, bfloat16, float, double} = DT_FLOAT")
    .Attr("Tindices: {int32, int64}")
    .Attr("Tsplits: {int32, int64}")
    .Attr("combiner: {'sum', 'mean', 'sqrtn'}")
    .Attr("bounds_check: {'error', 'skip'} = 'error'")
    .SetShapeFn(ResourceLookupShape)
    .Doc(R"doc(
DeWeightedPooledEmbeddingLookup on a resource variable, read in place without copying the table.
)doc");

REGISTER_OP("DeWeightedPooledEmbeddingLookupGrad")
    .Input("grad: Tout")
    .Input("ids: Tindices")
    .Input("row_splits: Tsplits")
    .Input("num_rows: int64")
    .Input("weights: Tout")
    .Output("unique_ids: Tindices")
    .Output("unique_grad: T")
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("Tout: {half, bfloat16, float, double} = DT_FLOAT")
    .Attr("Tindices: {int32, int64}")
    .Attr("Tsplits: {int32, int64}")
    .Attr("combiner: {'sum', 'mean', 'sqrtn'}")
    .Attr("bounds_check: {'error', 'skip'} = 'error'")
    .SetShapeFn(LookupGradShape)
    .Doc(R"doc(
The table's sparse gradient of DeWeightedPooledEmbeddingLookup: each distinct id with the sum of
w * grad / divisor over its occurrences.
)doc");

REGISTER_OP("DeSparseRowSplits")
    .Input("indices: int64")
    .Input("dense_shape: int64")
    .Output("row_splits: out_type")
    .Attr("out_type: {int32, int64} = DT_INT64")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle indices, dense_shape;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 2, &indices));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 1, &dense_shape));
      DimensionHandle rows = c->UnknownDim();
      const tensorflow::Tensor* shape_value = c->input_tensor(1);
      // The kernel rejects dense_shape[0] == INT64_MAX: its row_splits would not fit.
      if (shape_value != nullptr && shape_value->NumElements() == 2 &&
          shape_value->vec<int64_t>()(0) >= 0 &&
          shape_value->vec<int64_t>()(0) < std::numeric_limits<int64_t>::max()) {
        rows = c->MakeDim(shape_value->vec<int64_t>()(0) + 1);
      }
      c->set_output(0, c->Vector(rows));
      return absl::OkStatus();
    })
    .Doc(R"doc(
Row splits of a 2-D SparseTensor in canonical (row-major) order.

indices: [nnz, 2].
dense_shape: [2].
row_splits: [dense_shape[0] + 1].
)doc");

}  // namespace distributed_embeddings
