"""Keras 3 embedding layers backed by the library's pooled lookup kernels.

`Embedding` is a drop-in for `keras.layers.Embedding` with an optional `combiner` that pools the
last input dimension; its table is read in place (no copy) and its gradient is sparse.
"""

import operator

import keras
import numpy as np
import tensorflow as tf

from distributed_embeddings.python.ops import embedding_lookup_ops
from distributed_embeddings.python.training import sparse_updates

_COMBINERS = (None, "sum", "mean", "sqrtn")

# Keys a stock keras.layers.Embedding config may hold that this layer has no use for.
_UNSUPPORTED_KERAS_KEYS = (
  "mask_zero",
  "input_length",
  "lora_rank",
  "lora_alpha",
  "sparse",
  "quantization_config",
  "embeddings_dtype",
)


# kMaxIntegerLookupTokens in embedding/kernels/integer_lookup.h.
_MAX_INTEGER_LOOKUP_TOKENS = 2**40


def _positive_int(owner, arg, value):
  """`value` as a Python int. Python and NumPy integers and eager integer scalar tensors (say
  `tf.size(vocab)`) pass; bools, floats and values below 1 are a ValueError naming `arg`."""
  try:
    if isinstance(value, bool):
      raise TypeError
    number = operator.index(value)
  except TypeError:
    number = None
  if number is None or number <= 0:
    raise ValueError(f"{owner}: '{arg}' must be a positive integer; got {value!r}.")
  return number


def _native_lookup(table, ids, combiner, weights=None):
  """The same lookup with TensorFlow's own ops (use_custom_kernel=False)."""
  if isinstance(ids, tf.SparseTensor):
    ids = tf.RaggedTensor.from_sparse(ids)
    if weights is not None:
      weights = tf.RaggedTensor.from_sparse(weights)
  if combiner is None:
    if isinstance(ids, tf.RaggedTensor):
      rows = tf.ragged.map_flat_values(tf.gather, table, ids)
    else:
      rows = tf.gather(table, ids)
    return rows if weights is None else rows * tf.expand_dims(tf.cast(weights, rows.dtype), -1)
  if not isinstance(ids, tf.RaggedTensor):
    ids = tf.RaggedTensor.from_tensor(ids)
    if weights is not None:
      weights = tf.RaggedTensor.from_tensor(weights)
  rows = tf.ragged.map_flat_values(tf.gather, table, ids)
  # Half tables are summed in float32, as the kernels sum them, and rounded once.
  dtype = tf.float32 if table.dtype in (tf.float16, tf.bfloat16) else table.dtype
  if dtype != table.dtype:
    rows = tf.cast(rows, dtype)
  if weights is None:
    weights = tf.ones_like(ids, dtype=dtype)
  weights = tf.cast(weights, dtype)
  total = tf.reduce_sum(rows * tf.expand_dims(weights, -1), axis=1)
  if combiner == "sum":
    return tf.cast(total, table.dtype)
  divisor = tf.reduce_sum(weights if combiner == "mean" else weights * weights, axis=1)
  if combiner == "sqrtn":
    divisor = tf.sqrt(divisor)
  divisor = divisor[:, None]
  # An empty or zero-weight bag gives zeros, as the kernels do.
  safe = tf.where(tf.equal(divisor, 0), tf.ones_like(divisor), divisor)
  return tf.cast(tf.where(tf.equal(divisor, 0), tf.zeros_like(total), total / safe), table.dtype)


@keras.saving.register_keras_serializable(package="distributed_embeddings")
class Embedding(keras.layers.Layer):
  """Turns ids into embedding vectors, optionally pooling the last dimension.

  Args:
    input_dim: Size of the vocabulary (largest id + 1); must be positive.
    output_dim: Width of each embedding vector; must be positive.
    embeddings_initializer: Initializer of the table (a `keras.initializers` name or object).
    embeddings_regularizer: Regularizer of the table.
    activity_regularizer: Regularizer of the layer's output.
    embeddings_constraint: Constraint on the table.
    combiner: None, 'sum', 'mean' or 'sqrtn'. With a combiner the last input dimension is pooled:
      an N-D tensor (d1..dn), N >= 2, gives (d1..dn-1, output_dim); a 2-D RaggedTensor or
      SparseTensor (batch, hotness) gives (batch, output_dim). Without one the output is
      `inputs.shape + (output_dim,)` and ragged inputs stay ragged.
    use_custom_kernel: True (default) to use this library's kernels; False for TensorFlow's own
      ops, e.g. to compare against them.
    weights: Optional `[table]` to start from instead of the initializer.
    **kwargs: Standard layer arguments (`name`, `dtype`, `trainable`, ...).

  Call it as `layer(ids)` or, for weighted bags, `layer(ids, weights=w)`: `w` holds one
  floating-point weight per id with the structure of `ids` (`embedding_lookup`'s `weights`: a
  weighted sum, mean or sqrtn, or with no combiner each row scaled by its weight). (The
  constructor's `weights` is the Keras argument for the initial table, unrelated.)

  Under a mixed precision policy the table stays in the variable dtype (float32) and the output
  comes in the compute dtype. With `dtype="float16"` or `"bfloat16"` the table itself is half
  precision (half the memory) and is read in place: rows are summed in float32 and rounded once.
  Float ids are cast to integers.
  """

  def __init__(
    self,
    input_dim,
    output_dim,
    embeddings_initializer="uniform",
    embeddings_regularizer=None,
    activity_regularizer=None,
    embeddings_constraint=None,
    combiner=None,
    use_custom_kernel=True,
    weights=None,
    **kwargs,
  ):
    input_dim = _positive_int("Embedding", "input_dim", input_dim)
    output_dim = _positive_int("Embedding", "output_dim", output_dim)
    if combiner not in _COMBINERS:
      raise ValueError(
        f"Embedding: 'combiner' must be None, 'sum', 'mean' or 'sqrtn'; got {combiner!r}."
      )
    # The table is never cast to the compute dtype: only the pooled output is.
    kwargs["autocast"] = False
    super().__init__(activity_regularizer=activity_regularizer, **kwargs)
    self.input_dim = input_dim
    self.output_dim = output_dim
    self.embeddings_initializer = keras.initializers.get(embeddings_initializer)
    self.embeddings_regularizer = keras.regularizers.get(embeddings_regularizer)
    self.embeddings_constraint = keras.constraints.get(embeddings_constraint)
    self.combiner = combiner
    self.use_custom_kernel = use_custom_kernel
    self.supports_masking = False
    self.supports_jit = False  # Custom ops: no XLA.
    if weights is not None:
      # Built now, as keras.layers.Embedding does, so the values hold whenever the layer is first
      # called (also inside a tf.function).
      self.build()
      self.set_weights(weights)

  def build(self, input_shape=None):
    if self.built:
      return
    self.embeddings = self.add_weight(
      shape=(self.input_dim, self.output_dim),
      initializer=self.embeddings_initializer,
      name="embeddings",
      regularizer=self.embeddings_regularizer,
      constraint=self.embeddings_constraint,
      trainable=True,
    )
    sparse_updates.mark_embedding_table(self.embeddings)
    self.built = True

  def set_weights(self, weights):
    # The table's shape does not depend on the input, so weights can be set before the first
    # call, as with a stock Embedding given an input shape.
    if not self.built:
      self.build()
    super().set_weights(weights)

  def _lookup(self, ids, combiner, weights=None):
    if self.use_custom_kernel:
      # Half tables are read as they are; a float32 compute dtype gets their unrounded sums.
      return embedding_lookup_ops.embedding_lookup(
        self.embeddings, ids, combiner=combiner, weights=weights, output_dtype=self.compute_dtype
      )
    return _native_lookup(self.embeddings.value, ids, combiner, weights)

  def call(self, inputs, weights=None):
    if isinstance(inputs, tf.SparseTensor):
      if not inputs.dtype.is_integer:
        inputs = tf.SparseTensor(
          inputs.indices, tf.cast(inputs.values, tf.int64), inputs.dense_shape
        )
    elif isinstance(inputs, tf.RaggedTensor):
      if not inputs.dtype.is_integer:
        inputs = tf.cast(inputs, tf.int64)
    else:
      inputs = tf.convert_to_tensor(inputs)
      if not inputs.dtype.is_integer:
        inputs = tf.cast(inputs, tf.int64)
      elif inputs.dtype not in (tf.int32, tf.int64):
        inputs = tf.cast(inputs, tf.int64)

    rank = inputs.shape.rank
    if isinstance(inputs, (tf.RaggedTensor, tf.SparseTensor)):
      if rank != 2:
        raise ValueError(
          f"Embedding: ragged and sparse inputs must be 2-D; got shape {inputs.shape}."
        )
      output = self._lookup(inputs, self.combiner, weights)
    elif rank is None:
      raise ValueError("Embedding: inputs must have a known rank.")
    elif self.combiner is not None and rank < 2:
      raise ValueError(
        f"Embedding: a combiner pools the last dimension, so inputs must be at "
        f"least 2-D; got shape {inputs.shape}. Add a batch dimension."
      )
    else:
      # Fold every leading dimension into the batch: 2-D ids of (rows, last dimension).
      last = 1 if (rank < 2 or self.combiner is None) else -1
      shape_2d = [-1, tf.shape(inputs)[-1] if last == -1 else 1]
      ids_2d = tf.reshape(inputs, shape_2d)
      weights_2d = None
      if weights is not None:
        weights = embedding_lookup_ops.dense_weights(weights, inputs, "Embedding: 'weights'")
        weights_2d = tf.reshape(weights, shape_2d)
      output = self._lookup(ids_2d, self.combiner, weights_2d)
      leading = tf.shape(inputs) if self.combiner is None else tf.shape(inputs)[:-1]
      output = tf.reshape(output, tf.concat([leading, [self.output_dim]], axis=0))
      output.set_shape(self.compute_output_shape(inputs.shape))
    if output.dtype != self.compute_dtype:
      output = tf.cast(output, self.compute_dtype)
    return output

  def compute_output_shape(self, input_shape):
    input_shape = tuple(input_shape)
    if self.combiner is None:
      return input_shape + (self.output_dim,)
    return input_shape[:-1] + (self.output_dim,)

  def compute_output_spec(self, inputs, weights=None):
    ragged = getattr(inputs, "ragged", False) and self.combiner is None
    return keras.KerasTensor(
      self.compute_output_shape(inputs.shape), dtype=self.compute_dtype, ragged=ragged
    )

  def get_config(self):
    config = super().get_config()
    config.update(
      {
        "input_dim": self.input_dim,
        "output_dim": self.output_dim,
        "embeddings_initializer": keras.initializers.serialize(self.embeddings_initializer),
        "embeddings_regularizer": keras.regularizers.serialize(self.embeddings_regularizer),
        "activity_regularizer": keras.regularizers.serialize(self.activity_regularizer),
        "embeddings_constraint": keras.constraints.serialize(self.embeddings_constraint),
        "combiner": self.combiner,
        "use_custom_kernel": self.use_custom_kernel,
      }
    )
    return config

  @classmethod
  def from_config(cls, config):
    """Creates the layer from its config, or from a stock `keras.layers.Embedding` config."""
    config = dict(config)
    for key in _UNSUPPORTED_KERAS_KEYS:
      config.pop(key, None)
    return super().from_config(config)


def map_keys(inputs, lookup):
  """`lookup` (keys -> ids, elementwise) applied to dense, ragged or sparse `inputs`, keeping
  their shape, row partitions or indices."""
  if isinstance(inputs, tf.RaggedTensor):
    return inputs.with_flat_values(lookup(inputs.flat_values))
  if isinstance(inputs, tf.SparseTensor):
    return tf.SparseTensor(inputs.indices, lookup(inputs.values), inputs.dense_shape)
  return lookup(tf.convert_to_tensor(inputs))


def key_ids_spec(inputs):
  """The int64 ids a key lookup gives for symbolic `inputs`: their shape and format."""
  return keras.KerasTensor(
    inputs.shape,
    dtype="int64",
    sparse=getattr(inputs, "sparse", False),
    ragged=getattr(inputs, "ragged", False),
  )


@keras.saving.register_keras_serializable(package="distributed_embeddings")
class IntegerLookup(keras.layers.Layer):
  """Maps arbitrary integer keys to contiguous ids, building the vocabulary on the fly.

  Each new key met while training (or in a direct call) gets the next id in [1, max_tokens];
  0 is the out-of-vocabulary id: key -1 (the OOV token, as in keras.layers.IntegerLookup), keys
  met once the vocabulary is full (they stay OOV), and unknown keys in inference
  (`training=False`, as in `model.predict`). Dense inputs of any shape and ragged inputs keep
  their shape; sparse inputs keep their indices.

  The vocabulary is a non-trainable int64 weight, so it is saved and restored with the model
  (`model.save`, `tf.train.Checkpoint`). It lives in a hash table of this library's kernels:
  on the CPU, or on the GPU when `use_gpu` is true and a GPU is present. `set_weights` and Keras
  loading check a vocabulary whole before using it; a damaged one that arrives another way (a
  `tf.train.Checkpoint`, a direct `assign`) makes a CPU lookup raise InvalidArgumentError and a
  GPU lookup return OOV for the damaged keys, after a bounded wait, never a hang. On the GPU the
  ids given to the new keys of one call, and which new keys get the last free ids when the
  vocabulary fills up, depend on thread scheduling; on the CPU they follow first occurrence.

  Args:
    max_tokens: the largest id, so at most max_tokens keys have ids; a positive integer.
    use_gpu: whether the lookup may run on a GPU.
  """

  def __init__(self, max_tokens, use_gpu=True, **kwargs):
    max_tokens = _positive_int("IntegerLookup", "max_tokens", max_tokens)
    if max_tokens > _MAX_INTEGER_LOOKUP_TOKENS:
      raise ValueError(
        f"IntegerLookup: 'max_tokens' must be at most 2**40 (its state would "
        f"already take 32 TiB); got {max_tokens}."
      )
    kwargs["autocast"] = False
    super().__init__(**kwargs)
    self.max_tokens = max_tokens
    self.use_gpu = use_gpu
    initial = embedding_lookup_ops.initial_integer_lookup_state(max_tokens)
    self.state = self.add_weight(
      name="vocabulary",
      shape=initial.shape,
      dtype="int64",
      initializer=lambda shape, dtype=None: initial,
      trainable=False,
    )
    self.built = True

  def call(self, inputs, training=None):
    insert = training is not False

    def lookup(keys):
      if not keys.dtype.is_integer:
        raise TypeError(f"IntegerLookup: keys must be integers; got {keys.dtype.name}.")
      if keys.dtype not in (tf.int32, tf.int64):
        keys = tf.cast(keys, tf.int64)
      with tf.device(None if self.use_gpu else "/CPU:0"):
        return embedding_lookup_ops.integer_lookup(self.state, keys, self.max_tokens, insert)

    return map_keys(inputs, lookup)

  def compute_output_spec(self, inputs, training=None):
    return key_ids_spec(inputs)

  def set_weights(self, weights):
    """Loads a vocabulary state after checking it whole (InvalidArgumentError if corrupted)."""
    if len(weights) == 1:
      embedding_lookup_ops.validate_integer_lookup_state(weights[0], self.max_tokens)
    super().set_weights(weights)

  def load_own_variables(self, store):
    # What `keras.models.load_model` and `load_weights` call: check the state before it lands.
    if "0" in store:
      embedding_lookup_ops.validate_integer_lookup_state(np.asarray(store["0"]), self.max_tokens)
    super().load_own_variables(store)

  def vocabulary_size(self):
    """Ids in use, the OOV id included."""
    return int(self.state.numpy()[0]) + 1

  def get_vocabulary(self):
    """The keys in id order, starting with the OOV token -1 (id 0)."""
    state = self.state.numpy()
    pairs = state[1:].reshape(-1, 2)
    in_vocabulary = pairs[:, 1] > 0
    keys, ids = pairs[in_vocabulary, 0], pairs[in_vocabulary, 1]
    return [-1] + keys[ids.argsort()].tolist()

  def get_config(self):
    config = super().get_config()
    config.update({"max_tokens": self.max_tokens, "use_gpu": self.use_gpu})
    return config


@keras.saving.register_keras_serializable(package="distributed_embeddings")
class ConcatOneHotEmbedding(keras.layers.Layer):
  """Several one-hot features looked up in one concatenated table.

  Feature f has `feature_sizes[f]` rows, stored after the rows of the features before it, so one
  variable and one lookup serve every feature (what many small tables want).

  Args:
    feature_sizes: the number of rows of each feature, positive integers.
    embedding_width: the width of every feature's embedding, a positive integer.
    **kwargs: Standard layer arguments.

  Input: int ids `[batch, num_features]`, column f in [0, feature_sizes[f]); an id outside its
  own feature's range is an InvalidArgumentError, never a read of a neighbour's rows.
  Output: `[batch, num_features, embedding_width]`.
  """

  def __init__(self, feature_sizes, embedding_width, **kwargs):
    kwargs["autocast"] = False  # As in Embedding: only the output takes the compute dtype.
    super().__init__(**kwargs)
    self.feature_sizes = [
      _positive_int("ConcatOneHotEmbedding", f"feature_sizes[{f}]", size)
      for f, size in enumerate(feature_sizes)
    ]
    if not self.feature_sizes:
      raise ValueError("ConcatOneHotEmbedding: 'feature_sizes' must name at least one feature.")
    self.embedding_width = _positive_int(
      "ConcatOneHotEmbedding", "embedding_width", embedding_width
    )
    self._starts = [0]
    for size in self.feature_sizes[:-1]:
      self._starts.append(self._starts[-1] + size)
    self.params = self.add_weight(
      shape=(sum(self.feature_sizes), self.embedding_width), initializer="uniform", name="params"
    )
    sparse_updates.mark_embedding_table(self.params)

  def call(self, inputs):
    ids = tf.convert_to_tensor(inputs)
    if not ids.dtype.is_integer:
      raise TypeError(f"ConcatOneHotEmbedding: ids must be integers; got {ids.dtype.name}.")
    if ids.shape.rank != 2 or ids.shape[1] != len(self.feature_sizes):
      raise ValueError(
        f"ConcatOneHotEmbedding: ids must be [batch, {len(self.feature_sizes)}] "
        f"(one column per feature); got shape {ids.shape}."
      )
    ids = tf.cast(ids, tf.int64)
    with tf.control_dependencies(
      embedding_lookup_ops.row_id_checks(
        ids,
        [self.feature_sizes],
        "ConcatOneHotEmbedding: ids",
        f"their feature's size (feature_sizes={self.feature_sizes})",
      )
    ):
      rows = ids + tf.constant([self._starts], tf.int64)
    output = embedding_lookup_ops.embedding_lookup(self.params, rows)
    if output.dtype != self.compute_dtype:
      output = tf.cast(output, self.compute_dtype)
    return output

  def compute_output_shape(self, input_shape):
    return tuple(input_shape) + (self.embedding_width,)

  def get_config(self):
    config = super().get_config()
    config.update(
      {"feature_sizes": list(self.feature_sizes), "embedding_width": self.embedding_width}
    )
    return config


# The reference API's earlier name for the same layer; code written against it still runs.
ConcatEmbedding = ConcatOneHotEmbedding
