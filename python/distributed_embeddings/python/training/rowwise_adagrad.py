"""Row-wise Adagrad: Keras's Adagrad with one accumulator per embedding-table row.

An embedding table's Adagrad accumulator is as large as the table itself. Row-wise Adagrad (FBGEMM's
`EXACT_ROWWISE_ADAGRAD`, the TPU embedding's and TorchRec's default for large tables) keeps one
value per row instead, the running sum of the mean squared gradient of the row, so its state is
`width` times smaller and its update reads and writes that much less memory.
"""

import keras
import tensorflow as tf

from distributed_embeddings.python.training import sparse_updates


@keras.saving.register_keras_serializable(package="distributed_embeddings")
class RowwiseAdagrad(keras.optimizers.Adagrad):
  """Adagrad whose embedding tables keep one accumulator per row.

  For a table (a variable of `distributed_embeddings.Embedding` or `DistributedEmbedding`; see
  `is_embedding_table`) of shape [rows, width] the accumulator has shape [rows, 1], and a step with
  gradient rows g does, for every row it touches:

      a_row += mean(g * g);   row -= (learning_rate * g) / sqrt(a_row + epsilon)

  (Keras's Adagrad with the per-element square replaced by the row's mean: a width-1 table behaves
  as under `keras.optimizers.Adagrad`). Rows without gradient keep their values and accumulator.
  Every other variable (dense layers, `keras.layers.Embedding` tables) gets Keras's Adagrad. The
  arguments are Adagrad's. On one worker use it directly; on several, wrap it as any optimizer:
  `DistributedOptimizer(RowwiseAdagrad(...))`.

  A table split into column slices keeps one accumulator per row of each slice, the mean over
  the slice's columns, so training differs slightly from one worker's (whole, row-sliced and
  replicated tables train exactly as on one worker). `save_checkpoint` stores a row's state as
  the width-weighted mean of its slices' (what the whole row's accumulator would hold had the
  slices seen the same gradients) and `restore_checkpoint` gives it to every slice. To avoid
  column slices, pass `DistributedEmbedding` a `column_slice_threshold` above every table's size.
  """

  def build(self, var_list):
    if self.built:
      return
    keras.optimizers.Optimizer.build(
      self, var_list
    )  # iterations, learning rate; not Adagrad's slots
    initializer = keras.initializers.Constant(self.initial_accumulator_value)
    self._accumulators = []
    for variable in var_list:
      if sparse_updates.is_embedding_table(variable) and len(variable.shape) == 2:
        # Named as Keras names a slot: the distributed checkpoint finds a table's slots by name.
        self._accumulators.append(
          self.add_variable(
            shape=(variable.shape[0], 1),
            initializer=initializer,
            dtype=variable.dtype,
            name=f"{variable.path.replace('/', '_')}_accumulator",
          )
        )
      else:
        self._accumulators.append(
          self.add_variable_from_reference(variable, "accumulator", initializer=initializer)
        )

  def update_step(self, gradient, variable, learning_rate):
    accumulator = self._accumulators[self._get_variable_index(variable)]
    if tuple(accumulator.shape) == tuple(variable.shape):
      return super().update_step(gradient, variable, learning_rate)  # not a table, or width 1
    if isinstance(gradient, tf.IndexedSlices):
      return sparse_updates.rowwise_adagrad_step(self, gradient, variable, learning_rate)
    lr = tf.cast(learning_rate, variable.dtype)
    gradient = tf.cast(gradient, variable.dtype)
    self.assign_add(accumulator, tf.reduce_mean(tf.square(gradient), axis=1, keepdims=True))
    self.assign_sub(variable, (lr * gradient) / tf.sqrt(accumulator + self.epsilon))
    return None
