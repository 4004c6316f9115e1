"""Tests of distributed_embeddings.embedding_lookup against TF's native ops and NumPy."""

import threading

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np
import tensorflow as tf

import distributed_embeddings as de
from distributed_embeddings.python.ops import embedding_lookup_ops
import test_util


def _random_ragged(rng, batch, max_hotness, vocab, dtype=np.int64, allow_empty=True):
  lengths = rng.integers(0 if allow_empty else 1, max_hotness + 1, size=batch)
  values = rng.integers(0, vocab, size=int(lengths.sum())).astype(dtype)
  return values, lengths


def _numpy_pooled(table, values, lengths, combiner):
  """float64 reference: sum or mean of table rows per bag; empty bags give zeros."""
  out = np.zeros((len(lengths), table.shape[1]), np.float64)
  start = 0
  for b, n in enumerate(lengths):
    rows = table[values[start : start + n]].astype(np.float64)
    if n:
      out[b] = rows.sum(0) if combiner == "sum" else rows.mean(0)
    start += n
  return out


def _numpy_pooled_grad(table_shape, values, lengths, grad, combiner):
  dense = np.zeros(table_shape, np.float64)
  start = 0
  for b, n in enumerate(lengths):
    for j in range(start, start + n):
      dense[values[j]] += grad[b] / (n if combiner == "mean" else 1)
    start += n
  return dense


def _fwd_and_grad(fn, param):
  """Runs fn(param) under a tape; returns (output, dense gradient w.r.t. param, raw gradient)."""
  with tf.GradientTape() as tape:
    tape.watch(param)
    out = fn(param)
    flat = out.flat_values if isinstance(out, tf.RaggedTensor) else out
    # Non-uniform weights so that the gradient of every output element differs.
    weights = tf.reshape(tf.cast(tf.range(1, tf.size(flat) + 1) % 7, flat.dtype), tf.shape(flat))
    loss = tf.reduce_sum(flat * weights)
  grad = tape.gradient(loss, param)
  return out, tf.convert_to_tensor(grad), grad


class DenseIdsTest(test_util.TestCase):
  @parameterized.product(
    combiner=["sum", "mean"], id_dtype=[tf.int32, tf.int64], hotness=[1, 3, 207]
  )
  def test_matches_native_gather_reduce_in_float64(self, combiner, id_dtype, hotness):
    rng = np.random.default_rng(hotness)
    table = tf.constant(rng.standard_normal((69, 16)), tf.float64)
    ids = tf.constant(rng.integers(0, 69, size=(15, hotness)), id_dtype)
    reduce = tf.reduce_sum if combiner == "sum" else tf.reduce_mean
    out, grad, raw = _fwd_and_grad(lambda p: de.embedding_lookup(p, ids, combiner=combiner), table)
    ref_out, ref_grad, _ = _fwd_and_grad(lambda p: reduce(tf.gather(p, ids), axis=1), table)
    self.assertIsInstance(raw, tf.IndexedSlices)
    self.assertAllClose(ref_out, out, rtol=1e-6, atol=1e-12)
    self.assertAllClose(ref_grad, grad, rtol=1e-6, atol=1e-12)

  @parameterized.parameters("sum", "mean")
  def test_float32_is_bitwise_equal_to_native(self, combiner):
    # Same accumulation order as TF's CPU reduction, so a model can swap ops without drift.
    rng = np.random.default_rng(7)
    param = tf.Variable(rng.random((69, 64), dtype=np.float32))
    ids = tf.constant(rng.integers(0, 69, size=(15, 207)), tf.int64)
    reduce = tf.reduce_sum if combiner == "sum" else tf.reduce_mean
    out, grad, _ = _fwd_and_grad(lambda p: de.embedding_lookup(p, ids, combiner=combiner), param)
    ref_out, ref_grad, _ = _fwd_and_grad(lambda p: reduce(tf.nn.embedding_lookup(p, ids), 1), param)
    self.assertAllEqual(ref_out, out)
    self.assertAllEqual(ref_grad, grad)

  def test_no_combiner_returns_ids_shape_plus_width(self):
    rng = np.random.default_rng(0)
    table = tf.constant(rng.standard_normal((30, 5)), tf.float64)
    ids = tf.constant(rng.integers(0, 30, size=(4, 6)), tf.int32)
    out, grad, raw = _fwd_and_grad(lambda p: de.embedding_lookup(p, ids), table)
    ref_out, ref_grad, _ = _fwd_and_grad(lambda p: tf.gather(p, ids), table)
    self.assertEqual(out.shape, (4, 6, 5))
    self.assertAllClose(ref_out, out, rtol=0, atol=0)
    self.assertAllClose(ref_grad, grad, rtol=1e-12)
    # Each distinct id appears once in the sparse gradient.
    self.assertLen(np.unique(raw.indices.numpy()), len(raw.indices.numpy()))

  def test_empty_batch(self):
    table = tf.ones((10, 4))
    for combiner in (None, "sum", "mean"):
      out = de.embedding_lookup(table, tf.zeros((0, 3), tf.int64), combiner=combiner)
      self.assertEqual(out.shape[0], 0)

  def test_zero_hotness_gives_zeros(self):
    out = de.embedding_lookup(tf.ones((10, 4)), tf.zeros((3, 0), tf.int64), combiner="mean")
    self.assertAllEqual(np.zeros((3, 4)), out)

  def test_tf_function_with_unknown_shapes(self):
    table = tf.Variable(np.arange(40, dtype=np.float32).reshape(10, 4))

    @tf.function(input_signature=[tf.TensorSpec([None, None], tf.int64)])
    def lookup(ids):
      with tf.GradientTape() as tape:
        out = de.embedding_lookup(table, ids, combiner="sum")
        loss = tf.reduce_sum(out)
      return out, tf.convert_to_tensor(tape.gradient(loss, table))

    ids = np.array([[1, 2, 2], [9, 0, 1]])
    out, grad = lookup(tf.constant(ids))
    self.assertAllClose(_numpy_pooled(table.numpy(), ids.ravel(), [3, 3], "sum"), out)
    expected_grad = np.zeros((10, 4))
    np.add.at(expected_grad, ids.ravel(), 1.0)
    self.assertAllClose(expected_grad, grad)


class RaggedAndSparseIdsTest(test_util.TestCase):
  @parameterized.product(
    combiner=["sum", "mean"], id_dtype=[np.int32, np.int64], splits_dtype=[tf.int32, tf.int64]
  )
  def test_ragged_matches_numpy_and_native_sparse(self, combiner, id_dtype, splits_dtype):
    rng = np.random.default_rng(3)
    values, lengths = _random_ragged(rng, 40, 30, 69, id_dtype, allow_empty=False)
    table = tf.constant(rng.standard_normal((69, 24)), tf.float64)
    ids = tf.RaggedTensor.from_row_lengths(values, tf.constant(lengths, splits_dtype))
    out, grad, raw = _fwd_and_grad(lambda p: de.embedding_lookup(p, ids, combiner=combiner), table)
    self.assertIsInstance(raw, tf.IndexedSlices)
    ref_out, ref_grad, _ = _fwd_and_grad(
      lambda p: tf.nn.embedding_lookup_sparse(p, ids.to_sparse(), None, combiner=combiner), table
    )
    self.assertAllClose(ref_out, out, rtol=1e-6, atol=1e-12)
    self.assertAllClose(ref_grad, grad, rtol=1e-6, atol=1e-12)
    self.assertAllClose(_numpy_pooled(table.numpy(), values, lengths, combiner), out)

  @parameterized.parameters("sum", "mean")
  def test_ragged_empty_bags_give_zeros_never_nan(self, combiner):
    rng = np.random.default_rng(4)
    values, lengths = _random_ragged(rng, 50, 4, 20)
    lengths[::3] = 0
    values = rng.integers(0, 20, size=int(lengths.sum()))
    table = rng.standard_normal((20, 8))
    ids = tf.RaggedTensor.from_row_lengths(values, lengths)
    param = tf.constant(table)
    with tf.GradientTape() as tape:
      tape.watch(param)
      out = de.embedding_lookup(param, ids, combiner=combiner)
      upstream = tf.constant(rng.standard_normal(out.shape))
      loss = tf.reduce_sum(out * upstream)
    grad = tf.convert_to_tensor(tape.gradient(loss, param))
    self.assertFalse(np.isnan(out.numpy()).any())
    self.assertAllClose(_numpy_pooled(table, values, lengths, combiner), out)
    self.assertAllClose(
      _numpy_pooled_grad(table.shape, values, lengths, upstream.numpy(), combiner), grad
    )

  def test_ragged_without_combiner_stays_ragged(self):
    table = tf.constant(np.arange(12, dtype=np.float64).reshape(6, 2))
    ids = tf.ragged.constant([[1, 5], [], [0, 0, 3]], dtype=tf.int64)
    out = de.embedding_lookup(table, ids)
    self.assertIsInstance(out, tf.RaggedTensor)
    self.assertAllEqual(tf.ragged.map_flat_values(tf.gather, table, ids), out)

  @parameterized.parameters("sum", "mean")
  def test_sparse_matches_native_sparse_lookup(self, combiner):
    rng = np.random.default_rng(5)
    dense = rng.integers(0, 69, size=(15, 207)) * (rng.random((15, 207)) < 0.3)
    dense[:, 0] = rng.integers(1, 69, size=15)  # no empty row: TF's native op would drop it
    sp_ids = tf.sparse.from_dense(tf.constant(dense, tf.int64))
    table = tf.constant(rng.standard_normal((69, 64)), tf.float64)
    out, grad, raw = _fwd_and_grad(
      lambda p: de.embedding_lookup(p, sp_ids, combiner=combiner), table
    )
    ref_out, ref_grad, _ = _fwd_and_grad(
      lambda p: tf.nn.embedding_lookup_sparse(p, sp_ids, None, combiner=combiner), table
    )
    self.assertIsInstance(raw, tf.IndexedSlices)
    self.assertAllClose(ref_out, out, rtol=1e-6, atol=1e-12)
    self.assertAllClose(ref_grad, grad, rtol=1e-6, atol=1e-12)

  def test_sparse_with_empty_trailing_rows_keeps_batch(self):
    sp_ids = tf.SparseTensor([[0, 0], [0, 2], [2, 1]], tf.constant([3, 1, 2], tf.int64), [5, 4])
    table = np.arange(20, dtype=np.float32).reshape(5, 4)
    out = de.embedding_lookup(tf.constant(table), sp_ids, combiner="mean")
    expected = np.zeros((5, 4), np.float32)
    expected[0] = (table[3] + table[1]) / 2
    expected[2] = table[2]
    self.assertAllClose(expected, out)

  def test_sparse_without_combiner_is_dense_with_zeros(self):
    sp_ids = tf.SparseTensor([[0, 1], [1, 0]], tf.constant([3, 1], tf.int32), [2, 3])
    table = tf.constant(np.arange(10, dtype=np.float64).reshape(5, 2))
    out = de.embedding_lookup(table, sp_ids)
    expected = np.zeros((2, 3, 2))
    expected[0, 1] = table.numpy()[3]
    expected[1, 0] = table.numpy()[1]
    self.assertAllEqual(expected, out)


class VariableTableTest(test_util.TestCase):
  def test_reads_variable_after_sparse_updates(self):
    # A sparse update puts the variable in copy-on-read mode; reads must stay correct.
    rng = np.random.default_rng(8)
    table = tf.Variable(rng.standard_normal((100, 8)).astype(np.float32))
    ids = tf.constant(rng.integers(0, 100, size=(32, 5)))
    opt = tf.keras.optimizers.SGD(0.1)
    for _ in range(3):
      with tf.GradientTape() as tape:
        loss = tf.reduce_sum(de.embedding_lookup(table, ids, combiner="mean") ** 2)
      opt.apply_gradients([(tape.gradient(loss, table), table)])
    expected = _numpy_pooled(table.numpy(), ids.numpy().ravel(), [5] * 32, "mean")
    self.assertAllClose(expected, de.embedding_lookup(table, ids, combiner="mean"), rtol=1e-5)

  def test_keras_variable_and_sgd_step_match_native(self):
    import keras  # pylint: disable=import-outside-toplevel

    rng = np.random.default_rng(9)
    init = rng.standard_normal((50, 6)).astype(np.float32)
    ids = tf.ragged.constant([[1, 2, 3], [4], [1, 1, 49]], dtype=tf.int64)
    results = []
    for use_ours in (True, False):
      var = keras.Variable(init)
      with tf.GradientTape() as tape:
        if use_ours:
          out = de.embedding_lookup(var, ids, combiner="sum")
        else:
          out = tf.nn.embedding_lookup_sparse(var.value, ids.to_sparse(), None, combiner="sum")
        loss = tf.reduce_sum(out * out)
      grad = tape.gradient(loss, var.value if not use_ours else var)
      keras.optimizers.SGD(0.5).apply([grad], [var])
      results.append(var.numpy())
    self.assertAllClose(results[1], results[0], rtol=1e-6)

  def test_half_precision_table(self):
    table = tf.constant(np.arange(12).reshape(6, 2), tf.float16)
    out = de.embedding_lookup(table, tf.constant([[1, 2], [5, 5]]), combiner="sum")
    self.assertEqual(out.dtype, tf.float16)
    self.assertAllEqual([[6, 8], [20, 22]], out)


class ReadVarNoCopyTest(test_util.TestCase):
  def _copy_on_read_variable(self, rng, shape):
    table = tf.Variable(rng.standard_normal(shape).astype(np.float32))
    table.scatter_add(tf.IndexedSlices(tf.ones([2, shape[1]]), tf.constant([0, 3])))
    return table

  def test_value_matches_the_variable_in_copy_on_read_mode(self):
    rng = np.random.default_rng(20)
    table = self._copy_on_read_variable(rng, (10, 4))
    value = embedding_lookup_ops.read_var_no_copy(table)
    self.assertEqual(value.dtype, tf.float32)
    self.assertEqual(value.shape, [10, 4])
    self.assertAllEqual(table.numpy(), value)

  def test_shares_the_buffer_where_tf_read_copies(self):
    rng = np.random.default_rng(21)
    table = self._copy_on_read_variable(rng, (10, 4))
    # np.asarray views a CPU tensor's buffer (Tensor.numpy() would copy it).
    native = [np.asarray(table.read_value()) for _ in range(2)]
    ours = [np.asarray(embedding_lookup_ops.read_var_no_copy(table)) for _ in range(2)]
    self.assertTrue(np.shares_memory(ours[0], ours[1]))
    self.assertFalse(np.shares_memory(native[0], native[1]))

  def test_value_is_a_snapshot_across_later_updates(self):
    rng = np.random.default_rng(22)
    table = self._copy_on_read_variable(rng, (10, 4))
    before = table.numpy()
    value = embedding_lookup_ops.read_var_no_copy(table)
    table.assign_add(tf.ones([10, 4]))
    table.scatter_add(tf.IndexedSlices(tf.ones([1, 4]), tf.constant([5])))
    self.assertAllEqual(before, value)
    self.assertAllEqual(before + 1 + (np.arange(10) == 5)[:, None], table.numpy())

  def test_snapshot_survives_sparse_updates_in_copy_on_read_mode(self):
    # Copy-on-read mode lets TF's sparse updates write the buffer in place: the read must not
    # hand that buffer out as a snapshot without leaving the mode.
    rng = np.random.default_rng(24)
    table = self._copy_on_read_variable(rng, (10, 4))
    before = table.numpy()
    value = embedding_lookup_ops.read_var_no_copy(table)
    table.scatter_add(tf.IndexedSlices(tf.ones([1, 4]), tf.constant([5])))
    table.scatter_sub(tf.IndexedSlices(tf.ones([1, 4]), tf.constant([0])))
    self.assertAllEqual(before, value)
    expected = before + (np.arange(10) == 5)[:, None] - (np.arange(10) == 0)[:, None]
    self.assertAllEqual(expected, table.numpy())
    # A read after the update sees it, and the earlier value is still intact.
    self.assertAllEqual(expected, embedding_lookup_ops.read_var_no_copy(table))
    self.assertAllEqual(before, value)

  def test_snapshot_survives_a_sparse_optimizer_step_in_a_tf_function(self):
    import keras  # pylint: disable=import-outside-toplevel

    rng = np.random.default_rng(25)
    table = keras.Variable(rng.standard_normal((8, 3)).astype(np.float32))
    optimizer = keras.optimizers.SGD(0.5)

    @tf.function
    def step(ids):
      grad = tf.IndexedSlices(tf.ones([2, 3]), ids, tf.constant([8, 3]))
      optimizer.apply_gradients([(grad, table)])

    step(tf.constant([1, 2]))  # copy-on-read mode from here on
    before = table.numpy()
    value = tf.function(lambda: embedding_lookup_ops.read_var_no_copy(table))()
    step(tf.constant([2, 7]))
    self.assertAllEqual(before, value)
    self.assertAllClose(before - 0.5 * np.isin(np.arange(8), [2, 7])[:, None], table.numpy())

  def test_gradient_matches_native_read(self):
    rng = np.random.default_rng(23)
    table = tf.Variable(rng.standard_normal((6, 3)))
    weights = tf.constant(rng.standard_normal((6, 3)))
    grads = []
    for read in (embedding_lookup_ops.read_var_no_copy, lambda v: v.read_value()):
      with tf.GradientTape() as tape:
        loss = tf.reduce_sum(read(table) ** 2 * weights)
      grads.append(tape.gradient(loss, table))
    self.assertAllClose(2 * table.numpy() * weights.numpy(), grads[0])
    self.assertAllClose(grads[1], grads[0])

  def test_in_tf_function_and_for_integer_and_keras_variables(self):
    import keras  # pylint: disable=import-outside-toplevel

    counts = tf.Variable(np.arange(5, dtype=np.int64))
    read = tf.function(embedding_lookup_ops.read_var_no_copy)
    self.assertAllEqual(np.arange(5), read(counts))
    kvar = keras.Variable(np.eye(3, dtype=np.float32))
    self.assertAllEqual(np.eye(3), embedding_lookup_ops.read_var_no_copy(kvar))

  def test_non_variable_is_a_type_error(self):
    with self.assertRaisesRegex(TypeError, "'res_var'.*ndarray"):
      embedding_lookup_ops.read_var_no_copy(np.zeros(3))

  def test_raw_op_rejects_a_dtype_the_variable_does_not_hold(self):
    table = tf.Variable(tf.zeros([3, 2]))
    with self.assertRaisesRegex(
      tf.errors.InvalidArgumentError, "'resource' must hold double; got float"
    ):
      embedding_lookup_ops._ops.de_read_variable_no_copy(table.handle, dtype=tf.float64)  # pylint: disable=protected-access


class ConcurrentUpdateTest(test_util.TestCase):
  """What the lookup's shared lock guarantees against updates in other threads."""

  def test_lookup_never_sees_a_dense_update_half_applied(self):
    # assign_add holds the variable's lock exclusively while it writes the buffer in place, and
    # the lookup reads under the shared lock: every output is one version of the whole table.
    rows, width = 20000, 64
    table = tf.Variable(tf.zeros([rows, width]))
    ids = tf.reshape(tf.range(rows), [rows, 1])
    stop = threading.Event()

    def update():
      while not stop.is_set():
        table.assign_add(tf.ones([rows, width]))

    writer = threading.Thread(target=update)
    writer.start()
    try:
      versions = set()
      for _ in range(200):
        out = de.embedding_lookup(table, ids, combiner="sum").numpy()
        self.assertEqual(out.min(), out.max(), "a lookup saw two versions of the table")
        versions.add(float(out[0, 0]))
    finally:
      stop.set()
      writer.join()
    self.assertGreater(len(versions), 1, "the writer never ran during the lookups")


class BoundsCheckSkipTest(test_util.TestCase):
  def test_skip_ignores_invalid_ids_and_mean_divides_by_valid_count(self):
    table = np.arange(12, dtype=np.float32).reshape(6, 2)
    ids = tf.ragged.constant([[0, 9, 2], [-1], [3, 3]], dtype=tf.int64)
    param = tf.constant(table)
    with tf.GradientTape() as tape:
      tape.watch(param)
      out = de.embedding_lookup(param, ids, combiner="mean", bounds_check="skip")
    grad = tf.convert_to_tensor(tape.gradient(out, param))
    self.assertAllClose([(table[0] + table[2]) / 2, [0, 0], table[3]], out)
    expected = np.zeros_like(table)
    expected[0] = expected[2] = 0.5
    expected[3] = 1.0
    self.assertAllClose(expected, grad)


class BadInputTest(test_util.TestCase):
  def test_output_shape_past_int64_is_an_error_not_an_abort(self):
    # [4, 2**62] elements overflow int64: TensorShape's constructor would CHECK-fail.
    table = tf.zeros([0, 2**62])
    with self.assertRaisesRegex(
      tf.errors.InvalidArgumentError,
      r"output \[batch, width\] would have shape \[4, 4611686018427387904\]",
    ):
      de.embedding_lookup(
        table, tf.ragged.constant([[], [], [], []], dtype=tf.int64), combiner="sum"
      )

  def test_sparse_dense_shape_at_int64_max_is_an_error_not_an_abort(self):
    ids = tf.SparseTensor(tf.zeros([0, 2], tf.int64), tf.zeros([0], tf.int64), [2**63 - 1, 3])
    with self.assertRaises((tf.errors.InvalidArgumentError, ValueError)):
      de.embedding_lookup(tf.ones([5, 2]), ids, combiner="sum")

  def test_param_must_be_tensor_or_variable(self):
    with self.assertRaisesRegex(TypeError, "'param' must be a tf.Tensor or a variable; got list"):
      de.embedding_lookup([[1.0, 2.0]], tf.constant([[0]]))
    with self.assertRaisesRegex(TypeError, "got ndarray"):
      de.embedding_lookup(np.ones((3, 2)), tf.constant([[0]]))

  def test_ids_must_be_2d(self):
    table = tf.ones((5, 2))
    with self.assertRaisesRegex(ValueError, r"'ids' must be 2-D; got shape \(3,\)"):
      de.embedding_lookup(table, tf.constant([0, 1, 2]))
    with self.assertRaisesRegex(ValueError, "'ids' must be 2-D"):
      de.embedding_lookup(table, tf.zeros((2, 2, 2), tf.int32), combiner="sum")
    with self.assertRaisesRegex(ValueError, "'ids' must be 2-D"):
      de.embedding_lookup(table, tf.ragged.constant([[[0]]], ragged_rank=2))

  def test_unknown_combiner_and_bounds_check(self):
    with self.assertRaisesRegex(
      ValueError, "'combiner' must be None, 'sum', 'mean' or 'sqrtn'; got 'max'"
    ):
      de.embedding_lookup(tf.ones((5, 2)), tf.constant([[0]]), combiner="max")
    with self.assertRaisesRegex(ValueError, "'bounds_check' must be 'error' or 'skip'"):
      de.embedding_lookup(tf.ones((5, 2)), tf.constant([[0]]), bounds_check="clamp")

  def test_float_ids_are_a_type_error(self):
    with self.assertRaisesRegex(TypeError, "'ids' must be int32 or int64; got float32"):
      de.embedding_lookup(tf.ones((5, 2)), tf.constant([[0.0]]), combiner="sum")

  def test_out_of_range_ids_raise_invalid_argument_naming_them(self):
    table = tf.Variable(tf.ones((5, 2)))
    before = table.numpy()
    for combiner in (None, "sum", "mean"):
      with self.assertRaisesRegex(
        tf.errors.InvalidArgumentError, r"'ids' must be in \[0, 5\).*got ids\[3\] = 5\."
      ):
        de.embedding_lookup(table, tf.constant([[0, 1], [2, 5]]), combiner=combiner)
      with self.assertRaisesRegex(tf.errors.InvalidArgumentError, r"got ids\[1\] = -7\."):
        de.embedding_lookup(table, tf.ragged.constant([[0, -7]]), combiner=combiner)
    self.assertAllEqual(before, table.numpy())

  def test_malformed_row_splits_raise_invalid_argument(self):
    values = tf.constant([0, 1, 2], tf.int64)
    cases = {
      "must start at 0": [1, 2, 3],
      "must be non-decreasing": [0, 2, 1, 3],
      "must end at 3": [0, 1, 4],
    }
    for message, splits in cases.items():
      ids = tf.RaggedTensor.from_row_splits(values, tf.constant(splits, tf.int64), validate=False)
      with self.assertRaisesRegex(tf.errors.InvalidArgumentError, message):
        de.embedding_lookup(tf.ones((5, 2)), ids, combiner="sum")

  def test_unordered_sparse_ids_raise_with_a_hint(self):
    sp_ids = tf.SparseTensor([[1, 0], [0, 0]], tf.constant([1, 2], tf.int64), [2, 2])
    with self.assertRaisesRegex(tf.errors.InvalidArgumentError, "tf.sparse.reorder"):
      de.embedding_lookup(tf.ones((5, 2)), sp_ids, combiner="sum")
    sp_ids = tf.SparseTensor([[0, 0], [3, 0]], tf.constant([1, 2], tf.int64), [2, 2])
    with self.assertRaisesRegex(tf.errors.InvalidArgumentError, r"'indices' must lie in \[0, 2\)"):
      de.embedding_lookup(tf.ones((5, 2)), sp_ids, combiner="mean")

  def test_raw_ops_reject_bad_shapes(self):
    ops = embedding_lookup_ops._ops  # pylint: disable=protected-access
    with self.assertRaisesRegex(
      (tf.errors.InvalidArgumentError, ValueError), "'params' must be a 2-D table|must be rank 2"
    ):
      ops.de_pooled_embedding_lookup(
        tf.ones((5,)), tf.constant([0], tf.int64), tf.constant([0, 1], tf.int64), combiner="sum"
      )
    with self.assertRaisesRegex(
      (tf.errors.InvalidArgumentError, ValueError),
      "'row_splits' must be 1-D with at least 1 element|must be rank 1",
    ):
      ops.de_pooled_embedding_lookup(
        tf.ones((5, 2)), tf.constant([0], tf.int64), tf.zeros((0,), tf.int64), combiner="sum"
      )
    with self.assertRaisesRegex(tf.errors.InvalidArgumentError, "'grad' must be"):
      ops.de_pooled_embedding_lookup_grad(
        tf.ones((3, 2)),
        tf.constant([0], tf.int64),
        tf.constant([0, 1], tf.int64),
        tf.constant(5, tf.int64),
        combiner="sum",
        T=tf.float32,
      )
    with self.assertRaisesRegex(tf.errors.InvalidArgumentError, "'num_rows' must be"):
      ops.de_pooled_embedding_lookup_grad(
        tf.ones((1, 2)),
        tf.constant([0], tf.int64),
        tf.constant([0, 1], tf.int64),
        tf.constant(-1, tf.int64),
        combiner="sum",
        T=tf.float32,
      )
    with self.assertRaisesRegex(tf.errors.InvalidArgumentError, "'dense_shape' must hold"):
      ops.de_sparse_row_splits(tf.zeros((0, 2), tf.int64), tf.constant([-3, 2], tf.int64))


if __name__ == "__main__":
  absltest.main()
