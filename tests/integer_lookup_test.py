"""Tests of distributed_embeddings.IntegerLookup against a Python dict and keras.layers.IntegerLookup."""

import os

from absl.testing import absltest
import keras
import numpy as np
import tensorflow as tf

import distributed_embeddings as de
from distributed_embeddings.python.layers import embedding as embedding_module
import test_util


def _reference_ids(vocab, keys, max_tokens, insert=True):
  """Python reference: ids in order of first occurrence, 0 for OOV."""
  out = []
  for key in keys:
    if key == -1:
      out.append(0)
    elif key in vocab:
      out.append(vocab[key])
    elif insert and len(vocab) < max_tokens:
      vocab[key] = len(vocab) + 1
      out.append(vocab[key])
    else:
      out.append(0)
  return out


class IntegerLookupTest(test_util.TestCase):
  def test_reference_import_path(self):
    self.assertIs(embedding_module.IntegerLookup, de.IntegerLookup)

  def test_ids_follow_first_occurrence_and_stop_at_max_tokens(self):
    rng = np.random.default_rng(0)
    layer = de.IntegerLookup(300)
    vocab = {}
    for _ in range(10):
      keys = rng.zipf(1.3, size=200).astype(np.int64) * 1000003 - 5
      keys[::17] = -1
      expected = _reference_ids(vocab, keys.tolist(), 300)
      self.assertAllEqual(expected, layer(tf.constant(keys)))
    self.assertEqual(len(vocab) + 1, layer.vocabulary_size())

  def test_vocabulary_agrees_with_keras_integer_lookup(self):
    layer = de.IntegerLookup(50)
    keys = np.array([[7, 3, 7], [11, -1, 3], [2**40, 5, 11]], np.int64)
    ids = layer(keys)
    vocabulary = layer.get_vocabulary()
    self.assertEqual(-1, vocabulary[0])
    stock = keras.layers.IntegerLookup(vocabulary=vocabulary[1:], num_oov_indices=1, oov_token=-1)
    self.assertEqual(vocabulary, stock.get_vocabulary())
    self.assertAllEqual(stock(keys), ids)

  def test_shapes_are_preserved(self):
    layer = de.IntegerLookup(100)
    dense = np.arange(24, dtype=np.int64).reshape(2, 3, 4)
    self.assertEqual((2, 3, 4), tuple(layer(dense).shape))
    ragged = tf.ragged.constant([[5, 6], [], [7]], dtype=tf.int64)
    out = layer(ragged)
    self.assertIsInstance(out, tf.RaggedTensor)
    self.assertAllEqual(ragged.row_splits, out.row_splits)
    sparse = tf.sparse.from_dense(tf.constant([[0, 8], [9, 0]], tf.int64))
    self.assertAllEqual(sparse.indices, layer(sparse).indices)

  def test_inference_does_not_grow_the_vocabulary(self):
    layer = de.IntegerLookup(10)
    layer(tf.constant([4, 5]))
    self.assertAllEqual([2, 0, 1], layer(tf.constant([5, 6, 4]), training=False))
    self.assertEqual(3, layer.vocabulary_size())
    self.assertAllEqual([3], layer(tf.constant([6]), training=True))

  def test_int32_keys_and_tf_function(self):
    layer = de.IntegerLookup(10)
    fn = tf.function(lambda x: layer(x))
    self.assertAllEqual([1, 2, 1], fn(tf.constant([9, 8, 9], tf.int32)))
    self.assertAllEqual([2], fn(tf.constant([8], tf.int32)))

  def test_checkpoint_restores_the_vocabulary(self):
    layer = de.IntegerLookup(20)
    layer(tf.constant([30, 10, 20]))
    path = tf.train.Checkpoint(layer=layer).save(
      os.path.join(self.create_tempdir().full_path, "ckpt")
    )
    restored = de.IntegerLookup(20)
    tf.train.Checkpoint(layer=restored).restore(path).assert_existing_objects_matched()
    self.assertEqual(layer.get_vocabulary(), restored.get_vocabulary())
    self.assertAllEqual([3, 1, 4], restored(tf.constant([20, 30, 99])))

  def test_keras_model_round_trip_keeps_the_vocabulary(self):
    inputs = keras.Input(shape=(2,), dtype="int64")
    model = keras.Model(inputs, de.IntegerLookup(8, name="lookup")(inputs))
    model(np.array([[100, 200], [300, 100]]))
    path = os.path.join(self.create_tempdir().full_path, "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    self.assertEqual([-1, 100, 200, 300], loaded.get_layer("lookup").get_vocabulary())

  def test_with_embedding_in_fit(self):
    rng = np.random.default_rng(1)
    keys = rng.integers(10**9, 10**9 + 40, size=(512, 2))
    target = (keys % 2).sum(1, keepdims=True).astype(np.float32)  # linear in the bag of keys
    inputs = keras.Input(shape=(2,), dtype="int64")
    ids = de.IntegerLookup(64)(inputs)
    x = de.Embedding(65, 8, combiner="sum")(ids)
    model = keras.Model(inputs, keras.layers.Dense(1)(x))
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    history = model.fit(keys, target, batch_size=64, epochs=8, verbose=0)
    self.assertLess(history.history["loss"][-1], 0.1 * history.history["loss"][0])
    self.assertEqual(41, model.layers[1].vocabulary_size())

  def test_bad_arguments(self):
    for bad in (0, -5, 2.0, None):
      with self.assertRaisesRegex(ValueError, "'max_tokens' must be a positive integer"):
        de.IntegerLookup(bad)
    with self.assertRaisesRegex(TypeError, "keys must be integers; got float32"):
      de.IntegerLookup(4)(tf.constant([1.0]))

  def test_state_of_another_size_is_rejected(self):
    layer = de.IntegerLookup(10)
    layer.state.assign(de.python.ops.embedding_lookup_ops.initial_integer_lookup_state(10))
    other = tf.Variable(de.python.ops.embedding_lookup_ops.initial_integer_lookup_state(100))
    with self.assertRaisesRegex(
      tf.errors.InvalidArgumentError, "possibly a checkpoint of a layer of another size"
    ):
      de.python.ops.embedding_lookup_ops.integer_lookup(other, tf.constant([1]), 10)


class DamagedStateTest(test_util.TestCase):
  """A vocabulary from outside is checked, and a damaged one never hangs a lookup."""

  def _trained(self):
    layer = de.IntegerLookup(10)
    layer(tf.constant([30, 10, 20]))
    return layer, layer.state.numpy()

  def _slot_of(self, state, key):
    pairs = state[1:].reshape(-1, 2)
    return 1 + 2 * int(np.flatnonzero(pairs[:, 0] == key)[0])

  def test_key_without_id_is_an_error_on_cpu_not_a_hang(self):
    layer, state = self._trained()
    state[self._slot_of(state, 10) + 1] = -1  # the key's id is "being written", forever
    layer.state.assign(state)  # a direct assign skips the load-time check
    with self.assertRaisesRegex(
      tf.errors.InvalidArgumentError,
      "'state' is corrupted: key 10 is in the vocabulary without a valid id",
    ):
      layer(tf.constant([20, 10]), training=False)

  def test_id_above_the_vocabulary_is_an_error_on_cpu(self):
    layer, state = self._trained()
    state[self._slot_of(state, 20) + 1] = 11  # above max_tokens
    layer.state.assign(state)
    with self.assertRaisesRegex(tf.errors.InvalidArgumentError, "'state' is corrupted: key 20"):
      layer(tf.constant([20]))

  def test_set_weights_and_keras_loading_check_the_state(self):
    layer, state = self._trained()
    good = state.copy()
    for position, value, message in [
      (0, 11, r"vocabulary size outside \[0, 10\]; got 11"),
      (self._slot_of(state, 30) + 1, -1, "holds key 30 with id -1"),
      (self._slot_of(state, 30) + 1, 4, r"holds key 30 with id 4; .* ids in \[0, 3\]"),
      (self._slot_of(state, 30), -1, "holds key -1"),
    ]:
      bad = good.copy()
      bad[position] = value
      for load in (lambda w: layer.set_weights([w]), lambda w: layer.load_own_variables({"0": w})):
        with self.assertRaisesRegex(tf.errors.InvalidArgumentError, message):
          load(bad)
        self.assertAllEqual(good, layer.state.numpy())  # nothing was written
    layer.set_weights([good])
    self.assertAllEqual([2, 3, 1], layer(tf.constant([10, 20, 30])))

  def test_a_trained_state_passes_the_check(self):
    layer = de.IntegerLookup(40)
    layer(tf.constant(np.arange(1000, 1100)))  # fills up: the rest are OOV
    de.python.ops.embedding_lookup_ops.validate_integer_lookup_state(layer.state.numpy(), 40)

  def test_max_tokens_past_the_limit_is_a_value_error(self):
    with self.assertRaisesRegex(ValueError, "'max_tokens' must be at most 2\\*\\*40"):
      de.IntegerLookup(2**40 + 1)


if __name__ == "__main__":
  absltest.main()
