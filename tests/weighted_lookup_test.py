"""Weighted bags and the sqrtn combiner: `embedding_lookup(..., weights=...)` and
`Embedding(...)(ids, weights=...)` against TensorFlow's `embedding_lookup_sparse` in float64
(forward, table gradient and weights gradient), zero-weight and empty bags against NumPy, bad
input, and a weighted model trained with `fit`."""

from absl.testing import absltest
from absl.testing import parameterized
import keras
import numpy as np
import tensorflow as tf

import distributed_embeddings as de
from distributed_embeddings.python.ops import embedding_lookup_ops

_ops = embedding_lookup_ops._ops  # pylint: disable=protected-access

VOCAB, WIDTH = 40, 6


def _bags(seed, batch=9, max_hotness=5):
  """Ragged ids with repeats and empty bags, and positive weights (a well-conditioned mean)."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(0, max_hotness + 1, batch)
  lengths[0] = 0
  ids = [list(rng.integers(0, VOCAB // 4, n)) for n in lengths]  # small range: repeats
  weights = [list(0.25 + rng.random(n)) for n in lengths]
  return ids, weights


def _as(fmt, ragged, dtype):
  """`ragged` (a tf.RaggedTensor) as a dense, ragged or sparse tensor of `dtype`."""
  ragged = tf.cast(ragged, dtype)
  if fmt == "ragged":
    return ragged
  if fmt == "sparse":
    return ragged.to_sparse()
  return ragged.to_tensor()


def _tf_reference(table, ids, weights, combiner):
  """TensorFlow's embedding_lookup_sparse in float64, on the ragged form of the bags; output,
  dense table gradient and weights gradient (of loss = sum(out * y))."""
  table = tf.Variable(table)
  sp_ids = ids.to_sparse()
  sp_w = None if weights is None else weights.to_sparse()
  y = tf.constant(np.random.default_rng(7).standard_normal((ids.nrows(), WIDTH)))
  with tf.GradientTape() as tape:
    if sp_w is not None:
      tape.watch(sp_w.values)
    out = tf.nn.embedding_lookup_sparse(table, sp_ids, sp_w, combiner=combiner)
    # TF leaves out bags with no ids: pad them back as zeros.
    missing = tf.cast(ids.nrows(), tf.int32) - tf.shape(out)[0]
    out = tf.concat([out, tf.zeros([missing, WIDTH], out.dtype)], 0)
    loss = tf.reduce_sum(out * y)
  grads = tape.gradient(loss, [table] + ([sp_w.values] if sp_w is not None else []))
  return (
    out.numpy(),
    tf.convert_to_tensor(grads[0]).numpy(),
    (grads[1].numpy() if sp_w is not None else None),
    y,
  )


class WeightedLookupTest(parameterized.TestCase, tf.test.TestCase):
  @parameterized.product(
    fmt=["dense", "ragged", "sparse"],
    combiner=["sum", "mean", "sqrtn"],
    weighted=[True, False],
    table_kind=["variable", "tensor"],
    id_dtype=[tf.int32, tf.int64],
  )
  def test_matches_embedding_lookup_sparse(self, fmt, combiner, weighted, table_kind, id_dtype):
    raw_ids, raw_weights = _bags(seed=10 * ["dense", "ragged", "sparse"].index(fmt) + len(combiner))
    if fmt == "dense":  # fixed hotness
      raw_ids = [(row * 4 + [1, 2, 3, 4])[:4] for row in raw_ids]
      raw_weights = [(row * 4 + [0.5, 1.0, 1.5, 2.0])[:4] for row in raw_weights]
    ragged_ids = tf.ragged.constant(raw_ids, dtype=tf.int64, ragged_rank=1)
    ragged_w = tf.ragged.constant(raw_weights, dtype=tf.float64, ragged_rank=1)
    table = np.random.default_rng(1).standard_normal((VOCAB, WIDTH))
    want_out, want_grad, want_wgrad, y = _tf_reference(
      table, ragged_ids, ragged_w if weighted else None, combiner
    )
    if not weighted and combiner != "sum":
      # TF divides an empty bag's zero sum by zero: NaN, where we give zeros.
      want_out = np.nan_to_num(want_out)

    param = tf.Variable(table) if table_kind == "variable" else tf.constant(table)
    ids = _as(fmt, ragged_ids, id_dtype)
    weights = _as(fmt, ragged_w, tf.float64) if weighted else None
    watched = None if weights is None else (weights.values if fmt != "dense" else weights)
    with tf.GradientTape() as tape:
      tape.watch(param)
      if watched is not None:
        tape.watch(watched)
      out = de.embedding_lookup(param, ids, combiner, weights=weights)
      loss = tf.reduce_sum(out * y)
    grads = tape.gradient(loss, [param] + ([watched] if watched is not None else []))
    self.assertAllClose(out, want_out, rtol=1e-12, atol=1e-12)
    self.assertIsInstance(grads[0], tf.IndexedSlices)
    self.assertAllClose(tf.convert_to_tensor(grads[0]), want_grad, rtol=1e-12, atol=1e-12)
    if weighted:
      got_wgrad = grads[1].numpy().reshape(-1)
      if fmt == "dense":  # the dense weights hold every id; TF's sparse ones the same, in order
        got_wgrad = got_wgrad[: want_wgrad.size]
      self.assertAllClose(got_wgrad, want_wgrad, rtol=1e-10, atol=1e-12)

  @parameterized.parameters("mean", "sqrtn")
  def test_zero_weight_and_empty_bags_give_zeros_never_nan(self, combiner):
    table = np.arange(VOCAB * WIDTH, dtype=np.float64).reshape(VOCAB, WIDTH) / 10
    # Bag 0 empty; bag 1 all-zero weights; bag 2 weights summing to zero; bag 3 ordinary.
    ids = tf.ragged.constant([[], [3, 4], [5, 6], [7, 7]], dtype=tf.int64)
    w = tf.ragged.constant([[], [0.0, 0.0], [1.0, -1.0], [2.0, 1.0]], dtype=tf.float64)
    param = tf.Variable(table)
    with tf.GradientTape() as tape:
      tape.watch(w.values)
      out = de.embedding_lookup(param, ids, combiner, weights=w)
      loss = tf.reduce_sum(out)
    g_table, g_w = tape.gradient(loss, [param, w.values])
    expected = np.zeros((4, WIDTH))
    if combiner == "sqrtn":  # bag 2: (row5 - row6) / sqrt(2)
      expected[2] = (table[5] - table[6]) / np.sqrt(2.0)
    # Bag 3: (2 + 1) * row7, divided by 2 + 1 (mean) or sqrt(2^2 + 1^2) (sqrtn).
    expected[3] = 3.0 * table[7] / (3.0 if combiner == "mean" else np.sqrt(5.0))
    self.assertAllClose(out, expected)
    self.assertTrue(np.isfinite(tf.convert_to_tensor(g_table).numpy()).all())
    self.assertTrue(np.isfinite(g_w.numpy()).all())
    # The zero bags get no gradient, through the table or the weights.
    self.assertAllEqual(tf.convert_to_tensor(g_table).numpy()[[3, 4]], np.zeros((2, WIDTH)))
    self.assertAllEqual(g_w.numpy()[:2], [0.0, 0.0])
    if combiner == "mean":
      self.assertAllEqual(g_w.numpy()[2:4], [0.0, 0.0])

  def test_skipped_ids_carry_no_weight(self):
    table = np.random.default_rng(3).standard_normal((VOCAB, WIDTH))
    ids = tf.ragged.constant([[1, VOCAB + 3, 2], [-1]], dtype=tf.int64)
    w = tf.ragged.constant([[1.0, 5.0, 3.0], [2.0]], dtype=tf.float64)
    for combiner in ("sum", "mean", "sqrtn"):
      out = de.embedding_lookup(
        tf.constant(table), ids, combiner, weights=w, bounds_check="skip"
      ).numpy()
      total = table[1] + 3.0 * table[2]
      divisor = {"sum": 1.0, "mean": 4.0, "sqrtn": np.sqrt(10.0)}[combiner]
      self.assertAllClose(out[0], total / divisor)
      self.assertAllEqual(out[1], np.zeros(WIDTH))

  def test_no_combiner_scales_each_row(self):
    table = np.random.default_rng(4).standard_normal((VOCAB, WIDTH)).astype(np.float32)
    ids = tf.constant([[1, 2], [3, 3]])
    w = tf.constant([[0.5, 2.0], [1.0, -1.0]])
    out = de.embedding_lookup(tf.constant(table), ids, weights=w)
    self.assertAllClose(out, table[ids.numpy()] * w.numpy()[..., None])

  def test_float32_table_with_float64_weights(self):
    table = np.random.default_rng(5).standard_normal((VOCAB, WIDTH)).astype(np.float32)
    ids = tf.constant([[1, 2, 3]])
    w = tf.constant([[0.5, 2.0, 1.0]], tf.float64)
    out = de.embedding_lookup(tf.Variable(table), ids, "mean", weights=w)
    self.assertEqual(out.dtype, tf.float32)
    self.assertAllClose(out[0], (0.5 * table[1] + 2 * table[2] + table[3]) / 3.5, rtol=1e-6)

  def test_bad_weights_name_the_argument(self):
    table = tf.constant(np.ones((VOCAB, WIDTH)))
    ids = tf.ragged.constant([[1, 2], [3]], dtype=tf.int64)
    with self.assertRaisesRegex(TypeError, "'weights' must have the structure of 'ids'"):
      de.embedding_lookup(table, ids, "sum", weights=tf.constant([[1.0, 1.0], [1.0, 0.0]]))
    with self.assertRaisesRegex(TypeError, "'weights' must be a floating-point tensor"):
      de.embedding_lookup(table, ids, "sum", weights=tf.ragged.constant([[1, 2], [3]]))
    with self.assertRaisesRegex(ValueError, "same row_splits"):
      de.embedding_lookup(
        table, ids, "sum", weights=tf.ragged.constant([[1.0], [2.0, 3.0]], dtype=tf.float64)
      )
    with self.assertRaisesRegex(ValueError, "'weights' must have the shape of 'ids'"):
      de.embedding_lookup(table, tf.constant([[1, 2]]), "sum", weights=tf.constant([[1.0]]))
    with self.assertRaisesRegex(TypeError, "Pass bounds_check by keyword"):
      de.embedding_lookup(table, tf.constant([[1, 2]]), "sum", "skip")
    with self.assertRaisesRegex(ValueError, "'combiner' must be None, 'sum', 'mean' or 'sqrtn'"):
      de.embedding_lookup(table, tf.constant([[1, 2]]), "max")

  def test_sparse_weights_must_share_the_indices(self):
    ids = tf.SparseTensor([[0, 0], [0, 1], [1, 0]], tf.constant([1, 2, 3], tf.int64), [2, 2])
    w = tf.SparseTensor([[0, 0], [1, 0], [1, 1]], tf.constant([1.0, 2.0, 3.0]), [2, 2])
    with self.assertRaisesRegex(ValueError, "same indices"):
      de.embedding_lookup(tf.ones((VOCAB, WIDTH)), ids, "sum", weights=w)

  def test_raw_op_rejects_a_weight_count_that_is_not_the_id_count(self):
    with self.assertRaisesRegex(tf.errors.InvalidArgumentError, "'weights' must be 1-D with one"):
      _ops.de_weighted_pooled_embedding_lookup(
        tf.ones((4, 2)), tf.constant([0, 1, 2]), tf.constant([0, 3]), tf.ones([2]), combiner="sum"
      )
    with self.assertRaisesRegex(tf.errors.InvalidArgumentError, "'weights' must be 1-D with one"):
      _ops.de_weighted_pooled_embedding_lookup_grad(
        tf.ones((1, 2)),
        tf.constant([0, 1, 2]),
        tf.constant([0, 3]),
        tf.constant(4, tf.int64),
        tf.ones([4]),
        combiner="mean",
        T=tf.float32,
      )

  def test_graph_mode_structure_check(self):
    @tf.function
    def lookup(values, weight_splits):
      ids = tf.RaggedTensor.from_row_splits(values, tf.constant([0, 2, 3], tf.int64))
      w = tf.RaggedTensor.from_row_splits(tf.ones([3]), weight_splits)
      return de.embedding_lookup(tf.ones((VOCAB, 2)), ids, "sum", weights=w)

    values = tf.constant([1, 2, 3], tf.int64)
    self.assertAllClose(lookup(values, tf.constant([0, 2, 3], tf.int64)), [[2, 2], [1, 1]])
    with self.assertRaisesRegex(tf.errors.InvalidArgumentError, "same row_splits"):
      lookup(values, tf.constant([0, 1, 3], tf.int64))


class WeightedEmbeddingLayerTest(parameterized.TestCase, tf.test.TestCase):
  @parameterized.product(combiner=["sum", "mean", "sqrtn"], use_custom_kernel=[True, False])
  def test_layer_matches_reference(self, combiner, use_custom_kernel):
    layer = de.Embedding(
      VOCAB, WIDTH, combiner=combiner, use_custom_kernel=use_custom_kernel, dtype="float64"
    )
    ids = tf.ragged.constant([[1, 2, 2], [], [5]], dtype=tf.int64)
    w = tf.ragged.constant([[0.5, 1.0, 2.0], [], [3.0]], dtype=tf.float64)
    out = layer(ids, weights=w)
    table = layer.embeddings.numpy()
    want, _, _, _ = _tf_reference(table, ids, w, combiner)
    self.assertAllClose(out, want)
    # N-D dense ids fold into bags of the last dimension, weights alike.
    dense = tf.constant([[[1, 2], [3, 4]]])
    dense_w = tf.constant([[[1.0, 2.0], [0.0, 0.0]]], tf.float64)
    out = layer(dense, weights=dense_w).numpy()
    self.assertEqual(out.shape, (1, 2, WIDTH))
    divisor = {"sum": 1.0, "mean": 3.0, "sqrtn": np.sqrt(5.0)}[combiner]
    self.assertAllClose(out[0, 0], (table[1] + 2 * table[2]) / divisor)
    self.assertAllEqual(out[0, 1], np.zeros(WIDTH))

  def test_weighted_model_fits_like_the_native_one(self):
    """A subclassed model (never built by hand) with a weighted mean bag, trained with fit: ours
    and TensorFlow's own ops (use_custom_kernel=False) reach the same weights."""

    class Model(keras.Model):
      def __init__(self, use_custom_kernel):
        super().__init__()
        self.embedding = de.Embedding(
          VOCAB,
          4,
          combiner="sqrtn",
          use_custom_kernel=use_custom_kernel,
          embeddings_initializer=keras.initializers.RandomUniform(seed=3),
        )
        self.head = keras.layers.Dense(1, kernel_initializer="ones")

      def call(self, inputs):
        ids, weights = inputs
        return self.head(self.embedding(ids, weights=weights))

    rng = np.random.default_rng(0)
    ids = rng.integers(0, VOCAB, (64, 3))
    w = rng.random((64, 3)).astype("float32")
    y = rng.random((64, 1)).astype("float32")
    trained = []
    for custom in (True, False):
      model = Model(custom)
      model.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse")
      model.fit((ids, w), y, batch_size=16, epochs=2, verbose=0)
      trained.append(model.embedding.embeddings.numpy())
    self.assertAllClose(trained[0], trained[1], rtol=1e-5, atol=1e-6)
    self.assertGreater(
      np.abs(trained[0] - keras.initializers.RandomUniform(seed=3)((VOCAB, 4))).max(), 1e-3
    )


if __name__ == "__main__":
  absltest.main()
