"""Optimizer updates that touch only the rows a sparse (`tf.IndexedSlices`) gradient names.

Keras 3 applies even an `IndexedSlices` gradient with some whole-variable ops (Adagrad takes the
square root of the whole accumulator every step), which for a large embedding table costs more
than the rest of the step. `DistributedOptimizer` replaces those updates by the ones here, and
`RowwiseAdagrad` uses them for its tables.

On the CPU each update is one op of our kernel library (`DeSparseApply*`): it sums the rows of
repeated indices, then reads and writes every touched row of the table and its optimizer state
once, on all threads, under the variables' exclusive locks. Elsewhere (a table on a GPU, a dtype
the kernels do not take) the same rule runs as TensorFlow ops: gather, arithmetic, scatter.

When the gradient is, untouched, the output of our lookup's gradient op in the graph being built
(one lookup of the table in a `tf.function` step, as `model.fit` runs it), the update takes that
op's inputs instead (`DeSparseApplyLookupGrad`): the backward and the update in one pass, as
FBGEMM fuses them, so the unique gradient is never written out and read back. The gradient op is
then left without consumers and pruned. Same results, bit for bit.
"""

import os

import keras
import tensorflow as tf

from distributed_embeddings.python.ops import embedding_lookup_ops

_ops = embedding_lookup_ops._ops  # pylint: disable=protected-access

_KERNEL_DTYPES = (tf.float32, tf.float64)


def backing_variable(variable):
  """The `tf.Variable` that holds a Keras variable's value (the variable itself otherwise)."""
  inner = getattr(variable, "_value", None)
  return inner if isinstance(inner, tf.Variable) else variable


def mark_embedding_table(variable):
  """Records that `variable` is an embedding table (rows looked up by id): `RowwiseAdagrad` keeps
  one accumulator per row for it. Our layers mark their tables when they build them."""
  variable._de_embedding_table = True  # pylint: disable=protected-access


def is_embedding_table(variable):
  return bool(getattr(variable, "_de_embedding_table", False))


def fused_update_available(variable, *slots):
  """Whether our update kernels take `variable` (a tf.Variable) and its optimizer `slots`: a 2-D
  float32 or float64 table, all of them resource variables off the GPU (the kernels are CPU
  kernels). DE_FUSED_SPARSE_UPDATES=0 in the environment (read when a step is traced) turns the
  kernels off, for comparing against the TensorFlow-op path."""
  if os.environ.get("DE_FUSED_SPARSE_UPDATES", "1") == "0":
    return False
  for v in (variable,) + slots:
    if not isinstance(v, tf.Variable) or not hasattr(v, "handle"):
      return False
    if "GPU" in (v.device or "").upper():
      return False
  return variable.dtype in _KERNEL_DTYPES and variable.shape.rank == 2


_LOOKUP_GRAD_OPS = ("DePooledEmbeddingLookupGrad", "DeWeightedPooledEmbeddingLookupGrad")


def lookup_gradient_op(gradient):
  """The op of our lookup's backward whose two outputs `gradient` (IndexedSlices) is, unchanged,
  in the graph being built; None otherwise (eager, a gradient that was scaled, clipped, summed
  over several lookups or gathered from other workers). DE_FUSED_LOOKUP_UPDATES=0 in the
  environment (read when a step is traced) gives None always, for comparing the two paths."""
  if tf.executing_eagerly() or os.environ.get("DE_FUSED_LOOKUP_UPDATES", "1") == "0":
    return None
  if not isinstance(gradient, tf.IndexedSlices):
    return None
  values, indices = gradient.values, gradient.indices
  op = values.op
  if op.type not in _LOOKUP_GRAD_OPS or values.value_index != 1:
    return None
  if indices.op is not op or indices.value_index != 0:
    return None
  if op.graph is not tf.compat.v1.get_default_graph():
    return None
  return op


def _lookup_attrs(op):
  """The combiner and bounds check of a lookup-gradient op, as its op wrappers take them."""
  return dict(combiner=op.get_attr("combiner"), bounds_check=op.get_attr("bounds_check"))


def _apply_from_lookup(rule, gradient, variable, slots, hyper):
  """Applies `rule` to `variable` (and its state `slots`) with one DeSparseApplyLookupGrad in
  place of the gradient op that made `gradient`; False (nothing built) where that cannot be."""
  op = lookup_gradient_op(gradient)
  if op is None:
    return False
  # The fused kernel takes the lookup's output gradient in the table's dtype.
  if op.get_attr("T") != variable.dtype or op.get_attr("Tout") != variable.dtype:
    return False
  grad, ids, row_splits, num_rows = op.inputs[0], op.inputs[1], op.inputs[2], op.inputs[3]
  weights = [op.inputs[4]] if op.type == "DeWeightedPooledEmbeddingLookupGrad" else []
  _ops.de_sparse_apply_lookup_grad(
    [variable.handle] + [s.handle for s in slots],
    grad,
    ids,
    row_splits,
    num_rows,
    weights,
    hyper,
    rule=rule,
    **_lookup_attrs(op),
  )
  return True


def scale_sparse_gradient(gradient, scale):
  """`gradient` (IndexedSlices) with its values divided by `scale`. A gradient straight from our
  lookup's backward is rebuilt from the lookup's output gradient divided by `scale` instead, so the
  update can still fuse with the backward: the same numbers when `scale` is a power of two (the
  worker counts of most jobs), within rounding otherwise."""
  op = lookup_gradient_op(gradient)
  if op is None:
    return tf.IndexedSlices(gradient.values / scale, gradient.indices, gradient.dense_shape)
  inputs = list(op.inputs)
  inputs[0] = inputs[0] / tf.cast(scale, inputs[0].dtype)
  attrs = dict(_lookup_attrs(op), T=op.get_attr("T"))
  if op.type == "DeWeightedPooledEmbeddingLookupGrad":
    indices, values = _ops.de_weighted_pooled_embedding_lookup_grad(*inputs, **attrs)
  else:
    indices, values = _ops.de_pooled_embedding_lookup_grad(*inputs, **attrs)
  return tf.IndexedSlices(values, indices, gradient.dense_shape)


def unique_rows(gradient, dtype):
  """A sparse gradient's row indices, each once, and its values summed per row in `dtype` (the
  variable's, as Keras's dense gradient would be: float16 pieces under mixed precision would lose
  the small ones)."""
  indices, positions = tf.unique(gradient.indices)
  values = tf.math.unsorted_segment_sum(
    tf.cast(gradient.values, dtype), positions, tf.shape(indices)[0]
  )
  return indices, values


def sgd_step(optimizer, gradient, variable, learning_rate):
  """Keras SGD's update (without momentum) on the rows a sparse gradient touches: w -= g * lr,
  repeated indices' rows summed first (Keras subtracts each piece)."""
  del optimizer
  variable = backing_variable(variable)
  lr = tf.cast(learning_rate, variable.dtype)
  if fused_update_available(variable):
    if _apply_from_lookup("sgd", gradient, variable, [], [lr]):
      return
    _ops.de_sparse_apply_sgd(
      variable.handle, gradient.indices, tf.cast(gradient.values, variable.dtype), lr
    )
    return
  indices, values = unique_rows(gradient, variable.dtype)
  variable.scatter_sub(tf.IndexedSlices(values * lr, indices))


def adagrad_step(optimizer, gradient, variable, learning_rate):
  """Keras Adagrad's update on the rows a sparse gradient touches only.

  A row without gradient is left unchanged by Keras's whole-table update (its accumulator gains 0
  and its step is 0), so updating only the touched rows, with the same float operations in the
  same order, gives the same variable and accumulator when each id appears once. Repeated ids are
  summed before squaring (the Adagrad rule, and legacy tf.keras's); Keras 3 squares each piece.
  """
  _adagrad_rows(optimizer, gradient, variable, learning_rate, rowwise=False)


def rowwise_adagrad_step(optimizer, gradient, variable, learning_rate):
  """`RowwiseAdagrad`'s update of a table ([rows, 1] accumulator) from a sparse gradient."""
  _adagrad_rows(optimizer, gradient, variable, learning_rate, rowwise=True)


def _adagrad_rows(optimizer, gradient, variable, learning_rate, rowwise):
  """Adagrad on the touched rows: per element, or with one accumulator per row (`rowwise`)."""
  # pylint: disable=protected-access
  accumulator = optimizer._accumulators[optimizer._get_variable_index(variable)]
  accumulator = backing_variable(accumulator)
  variable = backing_variable(variable)
  lr = tf.cast(learning_rate, variable.dtype)
  epsilon = tf.cast(optimizer.epsilon, variable.dtype)
  if fused_update_available(variable, accumulator):
    rule = "rowwise_adagrad" if rowwise else "adagrad"
    if _apply_from_lookup(rule, gradient, variable, [accumulator], [lr, epsilon]):
      return
    op = _ops.de_sparse_apply_rowwise_adagrad if rowwise else _ops.de_sparse_apply_adagrad
    op(
      variable.handle,
      accumulator.handle,
      gradient.indices,
      tf.cast(gradient.values, variable.dtype),
      lr,
      epsilon,
    )
    return
  indices, values = unique_rows(gradient, variable.dtype)
  squares = tf.square(values)
  if rowwise:
    squares = tf.reduce_mean(squares, axis=1, keepdims=True)
  new_accumulator = tf.gather(accumulator, indices) + squares
  accumulator.scatter_update(tf.IndexedSlices(new_accumulator, indices))
  variable.scatter_sub(
    tf.IndexedSlices((lr * values) / tf.sqrt(new_accumulator + epsilon), indices)
  )


def lazy_adam_step(optimizer, gradient, variable, learning_rate):
  """Lazy Adam: Keras Adam's update on the rows a sparse gradient touches only.

  Unlike Adagrad this changes the numbers: Keras decays every row's moments each step and moves
  rows that had a gradient earlier, while here untouched rows keep their moments and values (the
  rule of TF1's LazyAdamOptimizer and of FBGEMM's and SOK's Adam). Touched rows go through
  Keras's operations in Keras's order, with the step count and bias correction of the whole
  optimizer, so a gradient that touches every row gives Keras's result.
  """
  # pylint: disable=protected-access
  index = optimizer._get_variable_index(variable)
  momentum = backing_variable(optimizer._momentums[index])
  velocity = backing_variable(optimizer._velocities[index])
  variable = backing_variable(variable)
  dtype = variable.dtype
  lr = tf.cast(learning_rate, dtype)
  local_step = tf.cast(optimizer.iterations + 1, dtype)
  beta_1_power = tf.pow(tf.cast(optimizer.beta_1, dtype), local_step)
  beta_2_power = tf.pow(tf.cast(optimizer.beta_2, dtype), local_step)
  alpha = lr * tf.sqrt(1 - beta_2_power) / (1 - beta_1_power)
  if not optimizer.amsgrad and fused_update_available(variable, momentum, velocity):
    hyper = [
      alpha,
      tf.cast(1 - optimizer.beta_1, dtype),
      tf.cast(1 - optimizer.beta_2, dtype),
      tf.cast(optimizer.epsilon, dtype),
    ]
    if _apply_from_lookup("lazy_adam", gradient, variable, [momentum, velocity], hyper):
      return
    _ops.de_sparse_apply_lazy_adam(
      variable.handle,
      momentum.handle,
      velocity.handle,
      gradient.indices,
      tf.cast(gradient.values, dtype),
      *hyper,
    )
    return
  indices, values = unique_rows(gradient, dtype)
  m = tf.gather(momentum, indices)
  m = m + (values - m) * (1 - optimizer.beta_1)
  v = tf.gather(velocity, indices)
  v = v + (tf.square(values) - v) * (1 - optimizer.beta_2)
  momentum.scatter_update(tf.IndexedSlices(m, indices))
  velocity.scatter_update(tf.IndexedSlices(v, indices))
  if optimizer.amsgrad:
    velocity_hat = backing_variable(optimizer._velocity_hats[index])
    v = tf.maximum(tf.gather(velocity_hat, indices), v)
    velocity_hat.scatter_update(tf.IndexedSlices(v, indices))
  variable.scatter_sub(tf.IndexedSlices((m * alpha) / (tf.sqrt(v) + optimizer.epsilon), indices))


def equivalent_step(optimizer):
  """The rows-only update that gives Keras's numbers for `optimizer` (for distinct ids), or None.
  Exact types: a subclass may change the rule. None for Adam, RMSprop and SGD with momentum,
  whose Keras updates move every row each step (decaying moments), so a rows-only update would
  change the numbers."""
  kind = type(optimizer)
  if kind is keras.optimizers.SGD and not optimizer.momentum:
    return sgd_step
  if kind is keras.optimizers.Adagrad:
    return adagrad_step
  return None


# Rows-only updates that change the numbers, used only when asked for (`lazy_sparse_updates`).
LAZY_STEPS = {keras.optimizers.Adam: lazy_adam_step}
