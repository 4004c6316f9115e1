"""Optimizer updates that touch only the rows a sparse (`tf.IndexedSlices`) gradient names.

Keras 3 applies even an `IndexedSlices` gradient with some whole-variable ops (Adagrad takes the
square root of the whole accumulator every step), which for a large embedding table costs more
than the rest of the step. `DistributedOptimizer` replaces those updates by the ones here.
"""

import keras
import tensorflow as tf


def backing_variable(variable):
  """The `tf.Variable` that holds a Keras variable's value (the variable itself otherwise)."""
  inner = getattr(variable, "_value", None)
  return inner if isinstance(inner, tf.Variable) else variable


def unique_rows(gradient, dtype):
  """A sparse gradient's row indices, each once, and its values summed per row in `dtype` (the
  variable's, as Keras's dense gradient would be: float16 pieces under mixed precision would lose
  the small ones)."""
  indices, positions = tf.unique(gradient.indices)
  values = tf.math.unsorted_segment_sum(
    tf.cast(gradient.values, dtype), positions, tf.shape(indices)[0]
  )
  return indices, values


def adagrad_step(optimizer, gradient, variable, learning_rate):
  """Keras Adagrad's update on the rows a sparse gradient touches only.

  A row without gradient is left unchanged by Keras's whole-table update (its accumulator gains 0
  and its step is 0), so updating only the touched rows, with the same float operations in the
  same order, gives the same variable and accumulator when each id appears once. Repeated ids are
  summed before squaring (the Adagrad rule, and legacy tf.keras's); Keras 3 squares each piece.
  """
  # pylint: disable=protected-access
  accumulator = optimizer._accumulators[optimizer._get_variable_index(variable)]
  accumulator = backing_variable(accumulator)
  variable = backing_variable(variable)
  lr = tf.cast(learning_rate, variable.dtype)
  indices, values = unique_rows(gradient, variable.dtype)
  new_accumulator = tf.gather(accumulator, indices) + tf.square(values)
  accumulator.scatter_update(tf.IndexedSlices(new_accumulator, indices))
  variable.scatter_sub(
    tf.IndexedSlices((lr * values) / tf.sqrt(new_accumulator + optimizer.epsilon), indices)
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


# Optimizers whose update of a sparse gradient DistributedOptimizer replaces by one that touches
# only the gradient's rows (same result for unique ids). Exact types: a subclass may change the
# rule. Not here: Adam, RMSprop and SGD with momentum, whose Keras updates move every row each
# step (decaying moments), so a rows-only update would change the numbers.
EQUIVALENT_STEPS = {keras.optimizers.Adagrad: adagrad_step}

# Rows-only updates that change the numbers, used only when asked for (`lazy_sparse_updates`).
LAZY_STEPS = {keras.optimizers.Adam: lazy_adam_step}
