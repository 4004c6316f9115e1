"""A consumer's Python test: imports the package (and its op library) from the vendored repository."""

from absl.testing import absltest
import numpy as np
import tensorflow as tf

import distributed_embeddings as de
from distributed_embeddings.python.layers.embedding import Embedding


class ConsumerTest(absltest.TestCase):
  def test_lookup_matches_numpy(self):
    table = np.arange(12, dtype=np.float32).reshape(6, 2)
    ids = tf.ragged.constant([[0, 5], [], [3]], dtype=tf.int64)
    out = de.embedding_lookup(tf.constant(table), ids, combiner="sum")
    np.testing.assert_array_equal([table[0] + table[5], [0, 0], table[3]], out.numpy())

  def test_reference_import_path_and_layer(self):
    self.assertIs(Embedding, de.Embedding)
    layer = de.Embedding(10, 4, combiner="mean")
    self.assertEqual((2, 4), tuple(layer(tf.constant([[1, 2], [3, 3]])).shape))


if __name__ == "__main__":
  absltest.main()
