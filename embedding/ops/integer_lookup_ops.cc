// Op definition of IntegerLookup: keys to contiguous ids through a vocabulary kept in a variable.
#include "tensorflow/core/framework/common_shape_fns.h"
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

REGISTER_OP("DeInitialIntegerLookupState")
    .Output("state: int64")
    .Attr("max_tokens: int >= 1")
    .SetShapeFn([](tensorflow::shape_inference::InferenceContext* c) {
      c->set_output(0, c->Vector(c->UnknownDim()));
      return absl::OkStatus();
    })
    .Doc(R"doc(
The vocabulary state of an empty IntegerLookup for `max_tokens` ids: the one definition of the
layout, which Python reads rather than repeats.
)doc");

REGISTER_OP("DeValidateIntegerLookupState")
    .Input("state: int64")
    .Attr("max_tokens: int >= 1")
    .SetIsStateful()  // no outputs: only its error matters, so it must never be pruned
    .SetShapeFn(tensorflow::shape_inference::NoOutputs)
    .Doc(R"doc(
Checks a whole IntegerLookup vocabulary at rest, as loading one from outside (set_weights, a
checkpoint) must: InvalidArgument names the first bad element.

state: the vocabulary's value (see embedding/kernels/integer_lookup.h for its layout).
)doc");

}  // namespace distributed_embeddings
