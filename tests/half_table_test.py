"""float16 and bfloat16 tables: read in their own dtype, summed in float32, checked against
float64 references built from TensorFlow's own ops on the same (exactly widened) values."""

import zlib

import numpy as np
import tensorflow as tf
from absl.testing import absltest, parameterized

import distributed_embeddings as de
import keras

V, D, BATCH = 97, 24, 13
# Half an ulp at 1 of what the lookup stores.
ROUNDING = {tf.float16: 2.0**-11, tf.bfloat16: 2.0**-8, tf.float32: 2.0**-24}
# Summing up to 12 float32 terms of magnitude about 1.
FLOAT_SUMS = 2e-6


def _bags(rng, batch=BATCH, max_hotness=12):
  lengths = rng.integers(0, max_hotness + 1, batch)
  lengths[0] = 0  # an empty bag
  return [list(rng.integers(0, V, n)) for n in lengths]


def _structure(bags, values, kind, dtype):
  """Per-id `values` (one list per bag) with the structure of the ids."""
  ragged = tf.ragged.constant(values, dtype=tf.float64, ragged_rank=1, inner_shape=())
  ragged = tf.cast(ragged, dtype)
  if kind == "ragged":
    return ragged
  if kind == "dense":
    return ragged.to_tensor()
  return _sparse_like(bags, ragged.values)


def _sparse_like(bags, values):
  indices = [[b, j] for b, bag in enumerate(bags) for j in range(len(bag))]
  return tf.SparseTensor(
    tf.constant(indices, tf.int64, shape=[len(indices), 2]), values, [len(bags), 12]
  )


def _make_ids(bags, kind):
  flat = tf.constant([i for bag in bags for i in bag], tf.int64)
  if kind == "ragged":
    return tf.RaggedTensor.from_row_lengths(flat, [len(b) for b in bags])
  if kind == "sparse":
    return _sparse_like(bags, flat)
  return tf.constant(bags, tf.int64)


def _reference(table64, bags, combiner, weights64=None):
  """float64 pooled lookup through tf.nn.embedding_lookup_sparse (which has no empty bags: those
  rows are zeros, as ours are)."""
  sp_ids = _sparse_like(bags, tf.constant([i for b in bags for i in b], tf.int64))
  sp_weights = None
  if weights64 is not None:
    sp_weights = _sparse_like(bags, tf.constant([w for b in weights64 for w in b], tf.float64))
  out = tf.nn.embedding_lookup_sparse(table64, sp_ids, sp_weights, combiner=combiner)
  # embedding_lookup_sparse gives as many rows as the last non-empty bag; pad to the batch.
  return tf.pad(out, [[0, len(bags) - tf.shape(out)[0]], [0, 0]])


class HalfTableLookupTest(parameterized.TestCase):
  @parameterized.product(
    dtype=["float16", "bfloat16"],
    output_dtype=[None, "float32"],
    kind=["dense", "ragged", "sparse"],
    combiner=["sum", "mean", "sqrtn"],
    weighted=[False, True],
    variable=[False, True],
  )
  def test_lookup_and_gradient_match_float64(
    self, dtype, output_dtype, kind, combiner, weighted, variable
  ):
    dtype = tf.as_dtype(dtype)
    rng = np.random.default_rng(zlib.crc32(f"{dtype.name} {kind} {combiner} {weighted}".encode()))
    table = tf.cast(rng.standard_normal((V, D)), dtype)
    table64 = tf.cast(table, tf.float64)  # exactly the values the kernel reads
    if kind == "dense":
      bags = [list(rng.integers(0, V, 5)) for _ in range(BATCH)]
    else:
      bags = _bags(rng)
    ids = _make_ids(bags, kind)
    out_dtype = tf.as_dtype(output_dtype) if output_dtype else dtype
    weights = weights64 = None
    if weighted:
      # Weights travel in the output dtype: the reference takes them rounded the same way.
      raw = [list(rng.uniform(0.25, 1.5, len(b))) for b in bags]
      rounded = [list(tf.cast(tf.cast(w, out_dtype), tf.float64).numpy()) for w in raw]
      weights64 = rounded
      weights = _structure(bags, raw, kind, tf.float32)
    # Upstream gradients exact in every dtype, so both sides see the same values.
    upstream = rng.choice([-2.0, -0.5, 0.25, 1.0, 1.5], (BATCH, D))

    param = tf.Variable(table) if variable else table
    with tf.GradientTape(persistent=True) as tape:
      if not variable:
        tape.watch(param)
      out = de.embedding_lookup(param, ids, combiner, weights=weights, output_dtype=output_dtype)
      loss = tf.reduce_sum(tf.cast(out, tf.float64) * upstream)
    grad = tape.gradient(loss, param)
    with tf.GradientTape() as tape64:
      tape64.watch(table64)
      ref = _reference(table64, bags, combiner, weights64)
      loss64 = tf.reduce_sum(ref * upstream)
    ref_grad = tf.convert_to_tensor(tape64.gradient(loss64, table64))

    self.assertEqual(out.dtype, out_dtype)
    out64 = tf.cast(out, tf.float64).numpy()
    ref = ref.numpy()
    tol = (ROUNDING[out_dtype] + FLOAT_SUMS) * (1 + np.abs(ref))
    np.testing.assert_array_less(np.abs(out64 - ref), tol + 1e-300)

    self.assertIsInstance(grad, tf.IndexedSlices)
    self.assertEqual(grad.values.dtype, dtype)  # gradients in the table's dtype
    dense_grad = tf.math.unsorted_segment_sum(
      tf.cast(grad.values, tf.float64), grad.indices, V
    ).numpy()
    self.assertLen(np.unique(grad.indices.numpy()), len(grad.indices.numpy()))
    grad_tol = (ROUNDING[dtype] + 50 * FLOAT_SUMS) * (1 + np.abs(ref_grad.numpy()))
    np.testing.assert_array_less(np.abs(dense_grad - ref_grad.numpy()), grad_tol)

  @parameterized.parameters("float16", "bfloat16")
  def test_variable_is_read_in_place_not_cast(self, dtype):
    table = tf.Variable(tf.zeros([V, D], dtype))
    ids = tf.ragged.constant([[1, 2], [3]], dtype=tf.int64)

    @tf.function
    def lookup(ids):
      return de.embedding_lookup(table, ids, "sum", output_dtype=tf.float32)

    graph = lookup.get_concrete_function(ids).graph
    op_types = [op.type for op in graph.get_operations()]
    self.assertIn("DeResourcePooledEmbeddingLookup", op_types)
    # No dense read of the table and no whole-table cast.
    self.assertNotIn("ReadVariableOp", op_types)
    self.assertNotIn("Cast", op_types)

  def test_output_dtype_is_checked(self):
    table = tf.zeros([4, 2], tf.bfloat16)
    with self.assertRaisesRegex(TypeError, "'output_dtype' must be None or a floating-point"):
      de.embedding_lookup(table, [[1]], "sum", output_dtype=tf.int32)

  def test_half_kernels_reject_bad_ids_by_name(self):
    table = tf.zeros([4, 2], tf.float16)
    with self.assertRaisesRegex(tf.errors.InvalidArgumentError, r"ids\[1\] = 9"):
      de.embedding_lookup(table, tf.ragged.constant([[0, 9]], dtype=tf.int64), "sum")


class HalfTableKerasTest(parameterized.TestCase):
  @parameterized.parameters("float16", "bfloat16")
  def test_layer_keeps_a_half_table_and_trains_with_fit(self, dtype):
    keras.utils.set_random_seed(3)
    rng = np.random.default_rng(3)
    ids = rng.integers(0, V, (256, 4))
    # A target the model can fit (a per-id score, pooled), so that the loss must fall; a random
    # target left the drop to the luck of the unseeded initializers.
    score = rng.standard_normal(V)
    target = score[ids].mean(axis=1, keepdims=True).astype("float32")
    embedding = de.Embedding(V, 8, combiner="mean", dtype=dtype)
    inputs = keras.Input((4,), dtype="int64")
    pooled = embedding(inputs)
    outputs = keras.layers.Dense(1, dtype="float32")(keras.ops.cast(pooled, "float32"))
    model = keras.Model(inputs, outputs)
    # Plain SGD: Keras's Adam keeps its moments in the variable's dtype, and in float16 its epsilon
    # underflows (stock keras.layers.Embedding diverges the same way).
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse")
    self.assertEqual(embedding.embeddings.dtype, dtype)
    before = embedding.embeddings.numpy().astype(np.float64)
    history = model.fit(ids, target, batch_size=16, epochs=6, verbose=0)
    self.assertEqual(embedding.embeddings.dtype, dtype)
    self.assertLess(history.history["loss"][-1], 0.5 * history.history["loss"][0])
    # Only looked-up rows moved.
    moved = np.any(embedding.embeddings.numpy().astype(np.float64) != before, axis=1)
    self.assertTrue(moved.any())
    self.assertFalse(moved[np.setdiff1d(np.arange(V), ids)].any())
    # The layer's output is its table's rows, pooled in float32 and rounded once.
    probe = ids[:8]
    table64 = embedding.embeddings.numpy().astype(np.float64)
    expected = table64[probe].mean(axis=1)
    got = np.asarray(embedding(probe)).astype(np.float64)
    tol = (ROUNDING[tf.as_dtype(dtype)] + FLOAT_SUMS) * (1 + np.abs(expected))
    np.testing.assert_array_less(np.abs(got - expected), tol)

  def test_distributed_embedding_with_a_bfloat16_dtype_keeps_bfloat16_tables(self):
    from distributed_embeddings import dist_model_parallel as dmp

    rng = np.random.default_rng(5)
    layers = [de.Embedding(V, 8, combiner="sum"), de.Embedding(40, 4, combiner="mean")]
    embedding = dmp.DistributedEmbedding(layers, dtype="bfloat16")
    ids = (rng.integers(0, V, (64, 3)), rng.integers(0, 40, (64, 2)))

    class Model(keras.Model):
      def __init__(self):
        super().__init__()
        self.embedding = embedding
        self.dense = keras.layers.Dense(1)

      def call(self, inputs):
        outs = self.embedding(list(inputs))
        return self.dense(tf.concat([tf.cast(o, tf.float32) for o in outs], axis=1))

    model = Model()
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    history = model.fit(ids, np.ones((64, 1), "float32"), batch_size=32, epochs=3, verbose=0)
    self.assertLess(history.history["loss"][-1], history.history["loss"][0])
    self.assertTrue(embedding.weights)
    for weight in embedding.weights:
      self.assertEqual("bfloat16", weight.dtype)
    # Its outputs are its tables' rows, pooled (one worker: the tables are whole).
    tables = [np.asarray(w, np.float64) for w in embedding.get_weights()]
    outs = embedding([tf.constant(ids[0][:4]), tf.constant(ids[1][:4])])
    for table, out, x, combine in zip(tables, outs, ids, (np.sum, np.mean)):
      expected = combine(table[x[:4]], axis=1)
      np.testing.assert_allclose(tf.cast(out, tf.float64).numpy(), expected, rtol=1e-2, atol=1e-2)

  def test_bfloat16_tables_export_for_serving_with_and_without_our_ops(self):
    import os
    import tempfile

    from distributed_embeddings import dist_model_parallel as dmp

    rng = np.random.default_rng(6)
    embedding = dmp.DistributedEmbedding(
      [de.Embedding(V, 8, combiner="sum"), de.Embedding(40, 4, combiner="mean")], dtype="bfloat16"
    )
    a, b = keras.Input((3,), dtype="int64"), keras.Input((2,), dtype="int64")
    pooled = [keras.ops.cast(o, "float32") for o in embedding([a, b])]
    model = keras.Model([a, b], keras.layers.Dense(1)(keras.layers.Concatenate()(pooled)))
    model.compile(optimizer="sgd", loss="mse")
    ids = [rng.integers(0, V, (16, 3)), rng.integers(0, 40, (16, 2))]
    model.fit(ids, np.ones((16, 1)), epochs=1, verbose=0)
    want = model.predict(ids, verbose=0)
    for native_ops in (False, True):
      path = tempfile.mkdtemp(dir=self.create_tempdir().full_path)
      dmp.export_for_serving(model, path, native_ops=native_ops)
      serve = tf.saved_model.load(os.path.join(path, "saved_model")).signatures["serving_default"]
      names = sorted(serve.structured_input_signature[1])
      got = next(iter(serve(**{n: tf.constant(x) for n, x in zip(names, ids)}).values()))
      # TensorFlow's own ops sum the bfloat16 rows in float32 too: the same predictions.
      np.testing.assert_array_equal(got.numpy(), want, err_msg=f"native_ops={native_ops}")


if __name__ == "__main__":
  absltest.main()
