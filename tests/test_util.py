"""Shared test base: absltest with NumPy-backed comparisons.

tf.test.TestCase is avoided on purpose: it adds a `test_session` stub that every run reports as
skipped, which would inflate the skip count CI prints.
"""

from absl.testing import parameterized
import numpy as np
import tensorflow as tf


def to_numpy(value):
  if isinstance(value, tf.RaggedTensor):
    return value.to_list()
  if isinstance(value, (tf.Tensor, tf.Variable)) or hasattr(value, "numpy"):
    return value.numpy()
  return value


class TestCase(parameterized.TestCase):
  """parameterized.TestCase plus array assertions that accept tensors."""

  def assertAllClose(self, expected, actual, rtol=1e-6, atol=1e-6):  # pylint: disable=invalid-name
    np.testing.assert_allclose(
      np.asarray(to_numpy(actual), dtype=np.float64),
      np.asarray(to_numpy(expected), dtype=np.float64),
      rtol=rtol,
      atol=atol,
    )

  def assertAllEqual(self, expected, actual):  # pylint: disable=invalid-name
    if isinstance(actual, tf.RaggedTensor) or isinstance(expected, tf.RaggedTensor):
      self.assertEqual(to_numpy(expected), to_numpy(actual))
    else:
      np.testing.assert_array_equal(np.asarray(to_numpy(actual)), np.asarray(to_numpy(expected)))
