"""Pooled embedding lookups backed by the library's own CPU and CUDA kernels.

Every input format (dense 2-D ids, `tf.RaggedTensor`, `tf.SparseTensor`) is brought to CSR form
(flat ids plus row_splits) and looked up by one op. A variable table is read in place through its
resource handle: no dense read, hence no whole-table copy after sparse optimizer updates have put
the variable in copy-on-read mode. Gradients are `tf.IndexedSlices` holding each distinct id once.
"""

import os

import tensorflow as tf
from tensorflow.python.framework import ops as framework_ops
from tensorflow.python.ops import resource_variable_ops

_ops = tf.load_op_library(
  os.path.join(os.path.dirname(os.path.abspath(__file__)), "_embedding_ops.so")
)

_COMBINERS = (None, "sum", "mean", "sqrtn")
_BOUNDS_CHECKS = ("error", "skip")
# Table dtypes the kernels read in place. Half and bfloat16 tables are summed in float32; their
# lookups can also give float32 outputs, rounded once.
_KERNEL_DTYPES = (tf.float16, tf.bfloat16, tf.float32, tf.float64)
_HALF_DTYPES = (tf.float16, tf.bfloat16)


def _resource_variable(param):
  """Returns the `tf.Variable` holding `param`'s table, or None if `param` is no variable."""
  if isinstance(param, tf.Variable):
    return param
  # A Keras 3 variable (TensorFlow backend) keeps its storage in a tf.Variable.
  inner = getattr(param, "_value", None)
  if isinstance(inner, tf.Variable) and hasattr(param, "path"):
    return inner
  return None


def _kernel_output_dtype(table_dtype, output_dtype):
  """The dtype the kernel writes for a table of `table_dtype` when `output_dtype` is asked for:
  float32 straight from a half table, else the table's own (cast afterwards if need be)."""
  if table_dtype in _HALF_DTYPES and output_dtype == tf.float32:
    return tf.float32
  return table_dtype


def _pooled_lookup(param, ids, row_splits, combiner, bounds_check, weights=None, output_dtype=None):
  """Runs the pooled lookup op on flat `ids` and `row_splits` (and flat `weights`, one per id, or
  None); returns [batch, width] of `output_dtype` (None: the table's)."""
  variable = _resource_variable(param)
  if variable is not None and variable.dtype in _KERNEL_DTYPES:
    resource_variable_ops.variable_accessed(variable)
    tout = _kernel_output_dtype(variable.dtype, output_dtype)
    if weights is not None:
      output = _ops.de_resource_weighted_pooled_embedding_lookup(
        variable.handle,
        ids,
        row_splits,
        tf.cast(weights, tout),  # also sets the op's Tout
        combiner=combiner,
        bounds_check=bounds_check,
        dtype=variable.dtype,
      )
    else:
      output = _ops.de_resource_pooled_embedding_lookup(
        variable.handle,
        ids,
        row_splits,
        combiner=combiner,
        bounds_check=bounds_check,
        dtype=variable.dtype,
        Tout=tout,
      )
  else:
    table = tf.convert_to_tensor(variable if variable is not None else param)
    # Tables of a dtype the kernels do not read are looked up as float32.
    compute = table if table.dtype in _KERNEL_DTYPES else tf.cast(table, tf.float32)
    tout = _kernel_output_dtype(compute.dtype, output_dtype or table.dtype)
    if weights is not None:
      output = _ops.de_weighted_pooled_embedding_lookup(
        compute,
        ids,
        row_splits,
        tf.cast(weights, tout),
        combiner=combiner,
        bounds_check=bounds_check,
      )
    else:
      output = _ops.de_pooled_embedding_lookup(
        compute, ids, row_splits, combiner=combiner, bounds_check=bounds_check, Tout=tout
      )
    output_dtype = output_dtype or table.dtype
  if output_dtype is not None and output.dtype != output_dtype:
    output = tf.cast(output, output_dtype)
  return output


def _unit_splits(count, dtype):
  """row_splits of `count` bags holding one id each."""
  return tf.range(tf.cast(count, dtype) + 1, dtype=dtype)


def _check_ids_dtype(dtype):
  if dtype not in (tf.int32, tf.int64):
    raise TypeError(f"embedding_lookup: 'ids' must be int32 or int64; got {dtype.name}.")


def _lookup_dense(param, ids, width, combiner, bounds_check, weights, output_dtype):
  ids_shape = tf.shape(ids, out_type=ids.dtype)
  flat_ids = tf.reshape(ids, [-1])
  flat_weights = None if weights is None else tf.reshape(weights, [-1])
  if combiner is None:
    output = _pooled_lookup(
      param,
      flat_ids,
      _unit_splits(tf.size(flat_ids), ids.dtype),
      "sum",
      bounds_check,
      flat_weights,
      output_dtype,
    )
    output = tf.reshape(output, tf.concat([tf.cast(ids_shape, tf.int32), tf.shape(output)[1:]], 0))
    output.set_shape(ids.shape.concatenate([width]))
    return output
  # Fixed hotness h: bag b holds ids[b, :], so row_splits = [0, h, 2h, ...].
  row_splits = tf.range(ids_shape[0] + 1, dtype=ids.dtype) * ids_shape[1]
  output = _pooled_lookup(
    param, flat_ids, row_splits, combiner, bounds_check, flat_weights, output_dtype
  )
  output.set_shape(ids.shape[:1].concatenate([width]))
  return output


def _lookup_ragged(param, ids, width, combiner, bounds_check, weights, output_dtype):
  if ids.ragged_rank != 1:
    raise ValueError(
      "embedding_lookup: 'ids' must be a 2-D RaggedTensor with one ragged "
      f"dimension; got ragged_rank {ids.ragged_rank}."
    )
  _check_ids_dtype(ids.values.dtype)
  values, checks = _weight_values(ids, weights)
  with tf.control_dependencies(checks):
    if combiner is None:
      splits = _unit_splits(tf.size(ids.values), ids.row_splits.dtype)
      looked_up = _pooled_lookup(
        param, ids.values, splits, "sum", bounds_check, values, output_dtype
      )
      looked_up.set_shape(ids.values.shape.concatenate([width]))
      return ids.with_values(looked_up)
    output = _pooled_lookup(
      param, ids.values, ids.row_splits, combiner, bounds_check, values, output_dtype
    )
  output.set_shape(ids.shape[:1].concatenate([width]))
  return output


def sparse_row_splits(indices, dense_shape):
  """int64 row_splits (CSR) of a 2-D SparseTensor's `indices`; an InvalidArgumentError names
  an index outside `dense_shape` or out of canonical row-major order."""
  return _ops.de_sparse_row_splits(indices, dense_shape, out_type=tf.int64)


def _lookup_sparse(param, ids, width, combiner, bounds_check, weights, output_dtype):
  _check_ids_dtype(ids.values.dtype)
  # Validates bounds and canonical order of the indices, and gives the CSR row_splits.
  row_splits = sparse_row_splits(ids.indices, ids.dense_shape)
  values, checks = _weight_values(ids, weights)
  with tf.control_dependencies(checks):
    if combiner is None:
      looked_up = _pooled_lookup(
        param,
        ids.values,
        _unit_splits(tf.size(ids.values), tf.int64),
        "sum",
        bounds_check,
        values,
        output_dtype,
      )
      with tf.control_dependencies([row_splits]):
        dense_shape = tf.concat(
          [ids.dense_shape, tf.shape(looked_up, out_type=tf.int64)[1:]], axis=0
        )
        output = tf.scatter_nd(ids.indices, looked_up, dense_shape)
      output.set_shape(ids.shape.concatenate([width]))
      return output
    output = _pooled_lookup(
      param, ids.values, row_splits, combiner, bounds_check, values, output_dtype
    )
  output.set_shape(ids.shape[:1].concatenate([width]))
  return output


def _weight_values(ids, weights):
  """(flat weights aligned with ragged or sparse `ids`' values, or None; the assertions that
  they share `ids`' row_splits or indices)."""
  if weights is None:
    return None, []
  if isinstance(ids, tf.RaggedTensor):
    return weights.values, _same_structure_checks(ids.row_splits, weights.row_splits, "row_splits")
  return weights.values, _same_structure_checks(ids.indices, weights.indices, "indices")


def same_values(a, b):
  """A bool scalar: whether integer tensors `a` and `b` have the same shape and values (`b` cast
  to `a`'s dtype). Nothing raises, whatever the shapes."""
  same_shape = tf.reduce_all(tf.equal(tf.shape(a), tf.shape(b)))
  return tf.cond(
    same_shape,
    lambda: tf.reduce_all(tf.equal(a, tf.cast(b, a.dtype))),
    lambda: tf.constant(False),
  )


def _same_structure_checks(ids_part, weights_part, name):
  """Assertions that `weights` has the same `name` (row_splits, indices) as `ids`; errors name
  both arguments. Eagerly a ValueError at once."""
  message = f"embedding_lookup: 'weights' must have the same {name} as 'ids'"
  if ids_part is weights_part:
    return []
  ids_shape, weights_shape = ids_part.shape, weights_part.shape
  if ids_shape.is_fully_defined() and weights_shape.is_fully_defined():
    if ids_shape != weights_shape:
      raise ValueError(f"{message}; got {name} of shapes {ids_shape} and {weights_shape}.")
  same = same_values(ids_part, weights_part)
  if tf.executing_eagerly():
    if not bool(same):
      raise ValueError(f"{message}.")
    return []
  return [tf.debugging.Assert(same, [message])]


def dense_weights(weights, ids, what, of="its ids"):
  """Dense per-id `weights` as a tensor, after checking that their static shape is `ids`'; the
  ValueError reads "<what> must have the shape of <of> <shape>; got <shape>"."""
  weights = tf.convert_to_tensor(weights)
  if weights.shape.rank is not None and not weights.shape.is_compatible_with(ids.shape):
    raise ValueError(f"{what} must have the shape of {of} {ids.shape}; got {weights.shape}.")
  return weights


def check_weights(ids, weights, what, of="'ids'"):
  """`weights` (not None) as per-id weights of the structure of `ids`: a tensor of its shape for
  dense ids, a RaggedTensor or SparseTensor for ragged or sparse ones, floating-point. Misuse is a
  TypeError or ValueError reading "<what> must ...", the ids named as `of`."""
  kind = {tf.RaggedTensor: "tf.RaggedTensor", tf.SparseTensor: "tf.SparseTensor"}
  ids_kind = next((k for k in kind if isinstance(ids, k)), None)
  weights_kind = next((k for k in kind if isinstance(weights, k)), None)
  if ids_kind is not weights_kind:
    raise TypeError(
      f"{what} must have the structure of {of} ({kind.get(ids_kind, 'a dense tensor')}); "
      f"got {kind.get(weights_kind, 'a dense tensor')}."
    )
  if weights_kind is None:
    weights = dense_weights(weights, ids, what, of)
    dtype = weights.dtype
  else:
    dtype = weights.values.dtype
  if not dtype.is_floating:
    raise TypeError(f"{what} must be a floating-point tensor; got {dtype.name}.")
  return weights


def embedding_lookup(
  param, ids, combiner=None, weights=None, bounds_check="error", output_dtype=None
):
  """Looks up embeddings of `ids` in `param`, optionally pooling each row of ids.

  Args:
    param: The whole table, [num_rows, width]: a `tf.Tensor`, a `tf.Variable` (read in place
      through its handle, never copied) or a Keras variable.
    ids: 2-D int32 or int64 ids: a dense `tf.Tensor` (fixed hotness), a `tf.RaggedTensor` whose
      values and row_splits are the CSR form of the id matrix, or a `tf.SparseTensor` in canonical
      row-major order.
    combiner: None, 'sum', 'mean' or 'sqrtn'. With None the result has shape
      `ids.shape + [width]` (ragged for ragged ids; for sparse ids a dense tensor with zeros where
      `ids` has no entry). Otherwise each row of ids (a bag) is reduced and the result is
      [batch, width]: 'sum' adds the rows, 'mean' divides that by the bag's length and 'sqrtn' by
      its square root (TensorFlow's `embedding_lookup_sparse` definitions). An empty bag gives
      zeros for every combiner.
    weights: None, or one floating-point weight per id with the structure of `ids` (a dense tensor
      of its shape, a `tf.RaggedTensor` with its row_splits, a `tf.SparseTensor` with its
      indices). A bag then gives sum(w * row), divided by sum(w) for 'mean' and by
      sqrt(sum(w * w)) for 'sqrtn'; a bag whose divisor is zero gives zeros, never NaN. With
      combiner None each row is scaled by its weight.
    bounds_check: 'error' (default) fails on an id outside [0, num_rows); 'skip' lets such ids
      contribute nothing (nor their weights), and a mean then divides by the number of valid ids.
    output_dtype: None (the table's dtype) or a floating-point dtype for the result. float16 and
      bfloat16 tables are read in their own dtype and summed in float32; with
      `output_dtype=tf.float32` their sums come out unrounded (FBGEMM's `output_dtype`), otherwise
      rounded once to the table's dtype. Any other choice casts the result.

  Returns:
    A tensor of `output_dtype`. Its gradient with respect to `param` is a `tf.IndexedSlices` of
    `param`'s dtype with each distinct id once; `weights` get a gradient too.

  Raises:
    TypeError: If `param` is not a tensor or variable, `ids` is not of an integer type, or
      `weights` is not floating-point or not of the structure of `ids`.
    ValueError: If `ids` is not 2-D, `weights` does not match `ids`, or `combiner` or
      `bounds_check` is not a known value.
  """
  if combiner not in _COMBINERS:
    raise ValueError(
      f"embedding_lookup: 'combiner' must be None, 'sum', 'mean' or 'sqrtn'; got {combiner!r}."
    )
  if bounds_check not in _BOUNDS_CHECKS:
    raise ValueError(
      f"embedding_lookup: 'bounds_check' must be 'error' or 'skip'; got {bounds_check!r}."
    )
  if _resource_variable(param) is None and not tf.is_tensor(param):
    raise TypeError(
      f"embedding_lookup: 'param' must be a tf.Tensor or a variable; got {type(param).__name__}."
    )
  if param.shape.rank is not None and param.shape.rank != 2:
    raise ValueError(f"embedding_lookup: 'param' must be 2-D; got shape {param.shape}.")
  width = param.shape[-1] if param.shape.rank is not None else None

  if isinstance(ids, (tf.RaggedTensor, tf.SparseTensor)):
    rank = ids.shape.rank
  else:
    ids = tf.convert_to_tensor(ids)
    rank = ids.shape.rank
  if rank != 2:
    raise ValueError(f"embedding_lookup: 'ids' must be 2-D; got shape {ids.shape}.")
  if isinstance(weights, str):
    raise TypeError(
      "embedding_lookup: 'weights' must be a tensor of per-id weights; got a string "
      f"({weights!r}). Pass bounds_check by keyword."
    )
  if weights is not None:
    weights = check_weights(ids, weights, "embedding_lookup: 'weights'")
  if output_dtype is not None:
    try:
      output_dtype = tf.dtypes.as_dtype(output_dtype)
    except TypeError:
      output_dtype = None
    if output_dtype is None or not output_dtype.is_floating:
      raise TypeError(
        "embedding_lookup: 'output_dtype' must be None or a floating-point dtype; got "
        f"{output_dtype!r}."
      )

  args = (param, ids, width, combiner, bounds_check, weights, output_dtype)
  if isinstance(ids, tf.RaggedTensor):
    return _lookup_ragged(*args)
  if isinstance(ids, tf.SparseTensor):
    return _lookup_sparse(*args)
  _check_ids_dtype(ids.dtype)
  return _lookup_dense(*args)


def read_var_no_copy(res_var):
  """Reads a variable's value without copying its buffer.

  TensorFlow's own read copies the whole buffer on every read once the variable is in
  copy-on-read mode, the mode any sparse update (a sparse optimizer step) leaves it in. This read
  hands out the variable's buffer itself, and takes the variable out of copy-on-read mode, so the
  value is a snapshot: later updates, dense or sparse, copy a buffer that is still shared before
  writing it (a sparse update re-enters copy-on-read mode, copying the table once if the value is
  still alive). A read that runs concurrently with an unordered update (two threads, no control
  dependency) can see it half applied, as TensorFlow's own reads can. The gradient flows to the
  variable as for an ordinary read.

  Args:
    res_var: A `tf.Variable` (resource variable) or a Keras variable.

  Returns:
    A tensor of the variable's dtype and shape.

  Raises:
    TypeError: If `res_var` is not a variable.
  """
  variable = _resource_variable(res_var)
  if variable is None:
    raise TypeError(
      "read_var_no_copy: 'res_var' must be a tf.Variable or a Keras variable; "
      f"got {type(res_var).__name__}."
    )
  resource_variable_ops.variable_accessed(variable)
  return _ops.de_read_variable_no_copy(variable.handle, dtype=variable.dtype)


@framework_ops.RegisterGradient("DeReadVariableNoCopy")
def _read_var_no_copy_grad(_, grad):
  return grad


def row_id_checks(ids, limit, what, limit_text=None):
  """Assertions that every one of `ids` lies in [0, limit), to run before the ids are offset into
  one part of a shared table (fused tables, concatenated features), where an id past its part
  would silently read a neighbour's rows. `limit` broadcasts against `ids`; the errors read
  "<what> must be >= 0" and "<what> must be < <limit_text or limit>". Returns the assertion ops
  for tf.control_dependencies (none when eager: eager assertions raise at once)."""
  checks = [
    tf.debugging.assert_non_negative(ids, message=f"{what} must be >= 0"),
    tf.debugging.assert_less(
      ids, tf.cast(limit, ids.dtype), message=f"{what} must be < {limit_text or limit}"
    ),
  ]
  return [c for c in checks if c is not None]


def _table_dtype(op):
  """The table dtype of a lookup op (its attr 'T', or 'dtype' for the resource ops)."""
  return op.get_attr("dtype" if op.inputs[0].dtype == tf.resource else "T")


def _sparse_gradient(op, grad, dense_shape):
  unique_ids, unique_grad = _ops.de_pooled_embedding_lookup_grad(
    grad,
    op.inputs[1],
    op.inputs[2],
    dense_shape[0],
    combiner=op.get_attr("combiner"),
    bounds_check=op.get_attr("bounds_check"),
    T=_table_dtype(op),
  )
  return [tf.IndexedSlices(unique_grad, unique_ids, dense_shape), None, None]


@framework_ops.RegisterGradient("DePooledEmbeddingLookup")
def _pooled_lookup_grad(op, grad):
  return _sparse_gradient(op, grad, tf.shape(op.inputs[0], out_type=tf.int64))


@framework_ops.RegisterGradient("DeResourcePooledEmbeddingLookup")
def _resource_pooled_lookup_grad(op, grad):
  return _sparse_gradient(
    op, grad, resource_variable_ops.variable_shape(op.inputs[0], out_type=tf.int64)
  )


def _weights_gradient(rows_of, grad, ids, row_splits, weights, num_rows, combiner, bounds_check):
  """d loss / d weights of a weighted lookup, from TensorFlow ops; `rows_of(ids)` gathers rows.

  With d_j = <grad[bag_j], row_j>, s_b = sum_j w_j d_j and divisor D_b: 'sum' gives d_j, 'mean'
  (D = sum w) (d_j - s_b / D) / D, 'sqrtn' (D = sqrt(sum w^2)) d_j / D - (s_b / D) w_j / D^2;
  zero where D is zero (the forward gave zeros) and for skipped ids."""
  valid = tf.ones_like(ids, tf.bool)
  if bounds_check == "skip":
    valid = tf.logical_and(ids >= 0, tf.cast(ids, tf.int64) < num_rows)
  safe_ids = tf.where(valid, ids, tf.zeros_like(ids))
  bag = tf.ragged.row_splits_to_segment_ids(row_splits, out_type=tf.int64)
  d = tf.reduce_sum(tf.cast(rows_of(safe_ids), grad.dtype) * tf.gather(grad, bag), axis=1)
  mask = tf.cast(valid, grad.dtype)
  if combiner == "sum":
    return d * mask
  num_bags = tf.shape(grad, out_type=tf.int64)[0]
  w = weights * mask
  total = tf.math.unsorted_segment_sum(w if combiner == "mean" else w * w, bag, num_bags)
  divisor = total if combiner == "mean" else tf.sqrt(total)
  divisor = tf.gather(divisor, bag)
  s = tf.gather(tf.math.unsorted_segment_sum(w * d, bag, num_bags), bag)
  nonzero = tf.not_equal(divisor, 0)
  safe = tf.where(nonzero, divisor, tf.ones_like(divisor))
  if combiner == "mean":
    grad_w = (d - s / safe) / safe
  else:
    grad_w = d / safe - (s / safe) * weights / (safe * safe)
  return tf.where(nonzero, grad_w, tf.zeros_like(grad_w)) * mask


def _string_attr(op, name):
  value = op.get_attr(name)
  return value.decode() if isinstance(value, bytes) else value


def _weighted_gradient(op, grad, dense_shape, rows_of):
  combiner = _string_attr(op, "combiner")
  bounds_check = _string_attr(op, "bounds_check")
  ids, row_splits, weights = op.inputs[1], op.inputs[2], op.inputs[3]
  unique_ids, unique_grad = _ops.de_weighted_pooled_embedding_lookup_grad(
    grad,
    ids,
    row_splits,
    dense_shape[0],
    weights,
    combiner=combiner,
    bounds_check=bounds_check,
    T=_table_dtype(op),
  )
  grads = [tf.IndexedSlices(unique_grad, unique_ids, dense_shape), None, None, None]
  # Eager tapes say which inputs need no gradient; the weights usually are data.
  if 3 not in (getattr(op, "skip_input_indices", None) or ()):
    grads[3] = _weights_gradient(
      rows_of, grad, ids, row_splits, weights, dense_shape[0], combiner, bounds_check
    )
  return grads


@framework_ops.RegisterGradient("DeWeightedPooledEmbeddingLookup")
def _weighted_pooled_lookup_grad(op, grad):
  table = op.inputs[0]
  return _weighted_gradient(
    op, grad, tf.shape(table, out_type=tf.int64), lambda ids: tf.gather(table, ids)
  )


@framework_ops.RegisterGradient("DeResourceWeightedPooledEmbeddingLookup")
def _resource_weighted_pooled_lookup_grad(op, grad):
  handle = op.inputs[0]
  dtype = op.get_attr("dtype")
  return _weighted_gradient(
    op,
    grad,
    resource_variable_ops.variable_shape(handle, out_type=tf.int64),
    lambda ids: resource_variable_ops.resource_gather(handle, ids, dtype=dtype),
  )


framework_ops.NotDifferentiable("DePooledEmbeddingLookupGrad")
framework_ops.NotDifferentiable("DeWeightedPooledEmbeddingLookupGrad")
framework_ops.NotDifferentiable("DeSparseRowSplits")

framework_ops.NotDifferentiable("DeIntegerLookup")


def integer_lookup(state, keys, max_tokens, insert=True):
  """Maps int32/int64 `keys` (any shape) to int64 ids in [0, max_tokens] through `state`.

  Args:
    state: the int64 variable holding the vocabulary, of integer_lookup_state_size(max_tokens)
      elements, initialized by initial_integer_lookup_state(max_tokens).
    keys: an integer tensor of any shape.
    max_tokens: the largest id.
    insert: whether unknown keys join the vocabulary (while there is room).

  Returns:
    int64 ids shaped like `keys`: 1..max_tokens for keys in the vocabulary, 0 for the rest.
  """
  variable = _resource_variable(state)
  if variable is None:
    raise TypeError(f"integer_lookup: 'state' must be a variable; got {type(state).__name__}.")
  resource_variable_ops.variable_accessed(variable)
  return _ops.de_integer_lookup(variable.handle, keys, max_tokens=max_tokens, insert=insert)


def integer_lookup_state_size(max_tokens):
  """Elements of the vocabulary state: the count plus a (key, id) pair per slot."""
  return int(initial_integer_lookup_state(max_tokens).shape[0])


def initial_integer_lookup_state(max_tokens):
  """The state of an empty vocabulary, as a NumPy array (the kernels define the layout)."""
  with framework_ops.init_scope():
    return _ops.de_initial_integer_lookup_state(max_tokens=max_tokens).numpy()


def validate_integer_lookup_state(state, max_tokens):
  """Checks a vocabulary state at rest (a NumPy array or tensor) before it is loaded.

  Raises:
    tf.errors.InvalidArgumentError: naming the first bad element: a wrong size, a vocabulary
      size outside [0, max_tokens], or a slot whose key has no valid id.
  """
  with framework_ops.init_scope():
    _ops.de_validate_integer_lookup_state(
      tf.convert_to_tensor(state, tf.int64), max_tokens=max_tokens
    )
