"""Tests of distributed_embeddings.Embedding against stock keras.layers.Embedding and NumPy."""

import os
import subprocess
import sys
import textwrap

from absl.testing import absltest
from absl.testing import parameterized
import keras
import numpy as np
import tensorflow as tf

import distributed_embeddings as de
from distributed_embeddings.python.layers import embedding as embedding_module
import test_util


def _reduce(x, combiner):
  if combiner is None:
    return x
  return keras.ops.sum(x, axis=-2) if combiner == "sum" else keras.ops.mean(x, axis=-2)


def _pair(input_dim=50, output_dim=8, combiner=None, seed=0, **kwargs):
  """Our layer and a stock Keras Embedding holding the same table."""
  table = np.random.default_rng(seed).standard_normal((input_dim, output_dim)).astype(np.float32)
  ours = de.Embedding(input_dim, output_dim, combiner=combiner, weights=[table], **kwargs)
  stock = keras.layers.Embedding(input_dim, output_dim, weights=[table])
  return ours, stock, table


class ConstructionTest(test_util.TestCase):
  @parameterized.parameters((0, 4), (10, 0), (-1, 4), (10, -3), (2.5, 4))
  def test_rejects_non_positive_dims(self, input_dim, output_dim):
    with self.assertRaisesRegex(ValueError, "must be a positive integer"):
      de.Embedding(input_dim, output_dim)

  def test_rejects_unknown_combiner(self):
    with self.assertRaisesRegex(
      ValueError, "'combiner' must be None, 'sum', 'mean' or 'sqrtn'; got 'max'"
    ):
      de.Embedding(10, 4, combiner="max")

  def test_reference_import_path(self):
    self.assertIs(embedding_module.Embedding, de.Embedding)

  def test_numpy_and_tensor_sizes_are_accepted(self):
    layer = de.Embedding(np.int64(6), tf.constant(3))
    self.assertEqual((6, 3), (layer.input_dim, layer.output_dim))
    self.assertIsInstance(layer.input_dim, int)
    vocab = tf.constant([4, 9, 4, 7])
    self.assertEqual(3, de.IntegerLookup(tf.size(tf.unique(vocab)[0])).max_tokens)

  def test_set_weights_before_the_first_call(self):
    table = np.arange(12, dtype=np.float32).reshape(6, 2)
    layer = de.Embedding(6, 2)
    layer.set_weights([table])
    self.assertAllEqual(table[[4, 1]], layer(tf.constant([4, 1])))

  def test_weights_argument_sets_the_table(self):
    table = np.arange(12, dtype=np.float32).reshape(6, 2)
    layer = de.Embedding(6, 2, weights=[table])
    layer(tf.constant([[1]]))
    self.assertAllEqual(table, layer.embeddings)


class ForwardTest(test_util.TestCase):
  @parameterized.product(combiner=[None, "sum", "mean"], shape=[(4, 3), (2, 5, 3), (2, 2, 2, 4)])
  def test_dense_inputs_match_stock_keras(self, combiner, shape):
    ours, stock, _ = _pair(combiner=combiner)
    ids = np.random.default_rng(1).integers(0, 50, size=shape)
    out = ours(ids)
    expected = _reduce(stock(ids), combiner)
    self.assertEqual(tuple(out.shape), tuple(expected.shape))
    self.assertEqual(ours.compute_output_shape(shape), tuple(expected.shape))
    self.assertAllEqual(expected, out)

  def test_one_dimensional_input(self):
    ours, stock, _ = _pair()
    ids = np.array([3, 1, 4])
    self.assertAllEqual(stock(ids), ours(ids))
    with self.assertRaisesRegex(ValueError, "at least 2-D"):
      de.Embedding(10, 2, combiner="sum")(tf.constant([1, 2]))

  def test_float_ids_are_cast(self):
    ours, stock, _ = _pair(combiner="sum")
    ids = np.array([[1.0, 7.0], [49.0, 0.0]], np.float32)
    self.assertAllEqual(_reduce(stock(ids.astype(np.int32)), "sum"), ours(ids))

  @parameterized.parameters("sum", "mean")
  def test_ragged_input_is_pooled(self, combiner):
    ours, _, table = _pair(combiner=combiner)
    ids = tf.ragged.constant([[1, 2, 3], [4], [5, 5]], dtype=tf.int64)
    rows = [table[[1, 2, 3]], table[[4]], table[[5, 5]]]
    expected = [r.sum(0) if combiner == "sum" else r.mean(0) for r in rows]
    self.assertAllClose(np.stack(expected), ours(ids))

  def test_ragged_input_without_combiner_stays_ragged(self):
    ours, stock, _ = _pair()
    ids = tf.ragged.constant([[1, 2, 3], [], [5]], dtype=tf.int64)
    out = ours(ids)
    self.assertIsInstance(out, tf.RaggedTensor)
    self.assertAllEqual(tf.ragged.map_flat_values(stock, ids), out)

  @parameterized.parameters("sum", "mean")
  def test_sparse_input_matches_native_sparse_lookup(self, combiner):
    ours, _, table = _pair(combiner=combiner)
    sp = tf.sparse.from_dense(tf.constant([[3, 0, 7], [0, 9, 9], [1, 0, 0]], tf.int64))
    expected = tf.nn.embedding_lookup_sparse(tf.constant(table), sp, None, combiner=combiner)
    self.assertAllClose(expected, ours(sp))

  @parameterized.parameters(None, "sum", "mean")
  def test_custom_kernel_matches_native_ops(self, combiner):
    ours, _, table = _pair(combiner=combiner)
    native = de.Embedding(50, 8, combiner=combiner, weights=[table], use_custom_kernel=False)
    dense = np.random.default_rng(2).integers(0, 50, size=(6, 4))
    ragged = tf.ragged.constant([[1, 2], [3], [4, 4, 4]], dtype=tf.int64)
    self.assertAllClose(native(dense), ours(dense))
    if combiner is not None:
      self.assertAllClose(native(ragged), ours(ragged))

  def test_negative_and_out_of_range_ids_raise_invalid_argument(self):
    layer = de.Embedding(10, 4, combiner="sum")
    with self.assertRaisesRegex(tf.errors.InvalidArgumentError, r"got ids\[1\] = -2\."):
      layer(tf.constant([[1, -2]]))
    with self.assertRaisesRegex(tf.errors.InvalidArgumentError, r"'ids' must be in \[0, 10\)"):
      de.Embedding(10, 4)(tf.ragged.constant([[3, 10]]))

  def test_nested_ragged_input_is_rejected(self):
    with self.assertRaisesRegex(ValueError, "ragged and sparse inputs must be 2-D"):
      de.Embedding(10, 4, combiner="sum")(tf.ragged.constant([[[1], [2, 3]]]))

  def test_tf_function(self):
    ours, stock, _ = _pair(combiner="mean")
    fn = tf.function(ours, input_signature=[tf.TensorSpec([None, None], tf.int64)])
    ids = np.random.default_rng(3).integers(0, 50, size=(5, 4))
    self.assertAllEqual(_reduce(stock(ids), "mean"), fn(tf.constant(ids)))


class ConcatOneHotEmbeddingTest(test_util.TestCase):
  def test_features_share_one_table(self):
    sizes, width = [3, 5, 7, 11], 3
    layer = embedding_module.ConcatOneHotEmbedding(sizes, width)
    self.assertIs(de.ConcatOneHotEmbedding, embedding_module.ConcatOneHotEmbedding)
    self.assertIs(embedding_module.ConcatEmbedding, embedding_module.ConcatOneHotEmbedding)
    ids = np.array([[1, 2, 3, 4], [2, 4, 6, 10], [0, 0, 0, 0]])
    out = layer(tf.constant(ids, tf.int32))
    table = layer.params.numpy()
    self.assertEqual((sum(sizes), width), table.shape)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    self.assertAllEqual(table[ids + starts], out)
    restored = embedding_module.ConcatOneHotEmbedding.from_config(layer.get_config())
    self.assertEqual((sizes, width), (restored.feature_sizes, restored.embedding_width))

  def test_bad_ids_and_arguments(self):
    layer = embedding_module.ConcatOneHotEmbedding([3, 5], 2)
    # Id 3 of feature 0 would read feature 1's first row.
    for bad in ([[3, 0]], [[0, 5]], [[-1, 0]]):
      with self.assertRaisesRegex(tf.errors.InvalidArgumentError, "ConcatOneHotEmbedding"):
        layer(tf.constant(bad))
    with self.assertRaisesRegex(ValueError, r"ids must be \[batch, 2\]"):
      layer(tf.constant([[0, 1, 2]]))
    with self.assertRaisesRegex(ValueError, r"'feature_sizes\[1\]' must be a positive integer"):
      embedding_module.ConcatOneHotEmbedding([3, 0], 2)


class ConfigTest(test_util.TestCase):
  def test_config_round_trip(self):
    layer = de.Embedding(
      20,
      4,
      combiner="mean",
      embeddings_initializer="zeros",
      embeddings_regularizer="l2",
      name="emb",
    )
    clone = de.Embedding.from_config(layer.get_config())
    self.assertEqual(layer.get_config(), clone.get_config())
    self.assertEqual("mean", clone.combiner)

  def test_from_stock_keras_config(self):
    stock = keras.layers.Embedding(
      30, 6, mask_zero=True, embeddings_initializer="ones", name="stock"
    )
    ours = de.Embedding.from_config(stock.get_config())
    self.assertEqual((30, 6), (ours.input_dim, ours.output_dim))
    self.assertIsNone(ours.combiner)
    self.assertAllEqual(np.ones((2, 3, 6)), ours(np.zeros((2, 3), np.int64)))


class TrainingTest(test_util.TestCase):
  def _train_step(self, layer, ids, optimizer, densify=False):
    opt = keras.optimizers.get({"class_name": optimizer, "config": {"learning_rate": 0.1}})
    with tf.GradientTape() as tape:
      out = layer(ids)
      out = out if isinstance(layer, de.Embedding) else _reduce(out, "sum")
      loss = tf.reduce_sum(out * tf.range(1.0, 9.0))
    grads = tape.gradient(loss, layer.trainable_variables)
    if densify:
      grads = [tf.convert_to_tensor(g) for g in grads]
    opt.apply(grads, layer.trainable_variables)
    return grads[0], layer.embeddings.numpy()

  @parameterized.parameters("sgd", "adagrad")
  def test_optimizer_step_matches_stock_keras(self, optimizer):
    ids = np.array([[1, 4, 9], [0, 2, 3]])  # distinct ids
    ours, stock, _ = _pair(combiner="sum", seed=5)
    grad, ours_table = self._train_step(ours, ids, optimizer)
    self.assertIsInstance(grad, tf.IndexedSlices)
    _, stock_table = self._train_step(stock, ids, optimizer)
    self.assertAllEqual(stock_table, ours_table)

  @parameterized.parameters("sgd", "adagrad")
  def test_repeated_ids_match_stock_keras_with_the_dense_gradient(self, optimizer):
    # Our gradient holds each id once, with its occurrences summed: the update is the one a dense
    # gradient gives. (Stock Keras 3 Adagrad fed a gather gradient with repeats squares each
    # occurrence separately instead.)
    ids = np.array([[1, 4, 4], [4, 2, 1]])
    ours, stock, _ = _pair(combiner="sum", seed=5)
    grad, ours_table = self._train_step(ours, ids, optimizer)
    self.assertLen(np.unique(grad.indices.numpy()), len(grad.indices.numpy()))
    _, stock_table = self._train_step(stock, ids, optimizer, densify=True)
    self.assertAllClose(stock_table, ours_table, rtol=1e-6, atol=1e-7)

  def test_fit_evaluate_predict_with_ragged_and_sparse_inputs(self):
    rng = np.random.default_rng(6)
    n = 256
    lengths = rng.integers(1, 6, size=n)
    ragged_ids = tf.RaggedTensor.from_row_lengths(rng.integers(0, 40, size=lengths.sum()), lengths)
    dense = rng.integers(0, 20, size=(n, 4))
    sparse_ids = tf.sparse.from_dense(dense * (rng.random((n, 4)) < 0.7))
    label = (ragged_ids.to_tensor()[:, 0].numpy() % 2).astype(np.float32)[:, None]

    seen = []

    class SparseSpy(de.Embedding):
      def call(self, inputs):
        seen.append(type(inputs).__name__)
        return super().call(inputs)

    ragged_in = keras.Input(shape=(None,), ragged=True, dtype="int64")
    sparse_in = keras.Input(shape=(4,), sparse=True, dtype="int64")
    pooled = keras.layers.Concatenate()(
      [
        de.Embedding(40, 8, combiner="mean")(ragged_in),
        SparseSpy(20, 8, combiner="sum")(sparse_in),
      ]
    )
    model = keras.Model([ragged_in, sparse_in], keras.layers.Dense(1)(pooled))
    model.compile(
      optimizer=keras.optimizers.Adam(0.05), loss=keras.losses.BinaryCrossentropy(from_logits=True)
    )
    data = tf.data.Dataset.from_tensor_slices(((ragged_ids, sparse_ids), label)).batch(32)
    history = model.fit(data, epochs=4, verbose=2)
    self.assertLess(history.history["loss"][-1], history.history["loss"][0])
    self.assertIn("SparseTensor", seen)
    loss = model.evaluate(data, verbose=0)
    self.assertAlmostEqual(history.history["loss"][-1], loss, delta=0.2)
    self.assertEqual((n, 1), model.predict(data, verbose=0).shape)

  def test_sequential_model_fit_matches_stock_keras_forward(self):
    ours, stock, table = _pair(input_dim=30, output_dim=4, combiner="mean")
    model = keras.Sequential([keras.Input(shape=(5,), dtype="int64"), ours, keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    ids = np.random.default_rng(9).integers(0, 30, size=(64, 5))
    self.assertAllClose(_reduce(stock(ids), "mean"), ours(ids))
    history = model.fit(ids, np.ones((64, 1)), epochs=3, batch_size=16, verbose=1)
    self.assertLess(history.history["loss"][-1], history.history["loss"][0])

  @parameterized.parameters("mixed_float16", "mixed_bfloat16")
  def test_mixed_precision_keeps_a_float32_table(self, policy):
    ours = de.Embedding(50, 8, combiner="sum", dtype=policy)
    ids = np.array([[1, 2], [3, 3]])
    out = ours(ids)
    self.assertEqual(tf.float32, ours.embeddings.dtype)
    self.assertEqual(policy.split("_")[1], out.dtype.name)
    expected = ours.embeddings.numpy()[ids].sum(1)
    self.assertAllClose(expected, tf.cast(out, tf.float32), rtol=1e-2, atol=1e-2)
    with tf.GradientTape() as tape:
      loss = tf.reduce_sum(tf.cast(ours(ids), tf.float32))
    self.assertEqual(tf.float32, tape.gradient(loss, ours.embeddings).dtype)


class SavingTest(test_util.TestCase):
  def _model(self):
    inputs = keras.Input(shape=(3,), dtype="int64")
    x = de.Embedding(30, 4, combiner="mean", name="emb")(inputs)
    return keras.Model(inputs, keras.layers.Dense(2)(x))

  def test_keras_format_round_trip(self):
    model = self._model()
    ids = np.random.default_rng(7).integers(0, 30, size=(5, 3))
    path = os.path.join(self.create_tempdir().full_path, "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    self.assertIsInstance(loaded.get_layer("emb"), de.Embedding)
    self.assertAllEqual(model.predict(ids, verbose=0), loaded.predict(ids, verbose=0))

  def test_saved_model_loads_in_a_fresh_process(self):
    model = self._model()
    ids = np.random.default_rng(8).integers(0, 30, size=(5, 3))
    module = tf.Module()
    module.model = model
    module.serve = tf.function(
      lambda x: model(x), input_signature=[tf.TensorSpec([None, 3], tf.int64)]
    )
    path = os.path.join(self.create_tempdir().full_path, "saved")
    tf.saved_model.save(module, path)
    expected = model(ids).numpy()
    script = textwrap.dedent(f"""
        import numpy as np, tensorflow as tf
        import distributed_embeddings  # registers the ops the graph uses
        loaded = tf.saved_model.load({path!r})
        out = loaded.serve(tf.constant(np.array({ids.tolist()!r}), tf.int64))
        np.save({path!r} + "/out.npy", out.numpy())
        """)
    subprocess.run(
      [sys.executable, "-c", script], check=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    )
    self.assertAllEqual(expected, np.load(path + "/out.npy"))


if __name__ == "__main__":
  absltest.main()
