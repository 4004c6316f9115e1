// Op definition of IntegerLookup: keys to contiguous ids through a vocabulary kept in a variable.
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace distributed_embeddings {

REGISTER_OP("DeIntegerLookup")
    .Input("state: resource")
    .Input("keys: Tkeys")
    .Output("ids: int64")
    .Attr("Tkeys: {int32, int64}")
    .Attr("max_tokens: int >= 1")
    .Attr("insert: bool = true")
    .SetShapeFn([](tensorflow::shape_inference::InferenceContext* c) {
      c->set_output(0, c->input(1));
      return absl::OkStatus();
    })
    .Doc(R"doc(
Maps int64 keys to ids in [1, max_tokens] (0 is out of vocabulary), inserting unknown keys into
the vocabulary held by the int64 variable `state` when `insert` is true.

state: the vocabulary (see embedding/kernels/integer_lookup.h for its layout).
keys: keys of any shape.
ids: ids of the same shape.
)doc");

}  // namespace distributed_embeddings
