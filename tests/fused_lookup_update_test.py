"""The lookup backward fused with the sparse update (DeSparseApplyLookupGrad): the raw op against
the rules in float64 and, bit for bit, against the gradient op followed by the update op; bad
input named with nothing written; and the optimizers choosing it in `model.fit` and in custom
`tf.function` steps (same numbers as the unfused path), but not where the gradient was changed."""

import os
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import keras
import numpy as np
import tensorflow as tf

import distributed_embeddings as de
from distributed_embeddings import dist_model_parallel as dmp
from distributed_embeddings.python.ops import embedding_lookup_ops
from distributed_embeddings.python.training import sparse_updates
from sparse_rules import BETA1, BETA2, EPS, LR
from sparse_rules import apply_raw
from sparse_rules import reference
import test_util

_ops = embedding_lookup_ops._ops  # pylint: disable=protected-access

from sparse_rules import RULES


def _bags(rows, batch, max_len, seed, invalid=0.0):
  """Ragged ids (values, row_splits) with repeats, weights and an upstream gradient."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(0, max_len + 1, batch)
  ids = (rng.random(lengths.sum()) ** 2 * rows).astype(np.int64)
  bad = rng.random(ids.size) < invalid
  ids[bad] = rows + rng.integers(0, 3, bad.sum())
  splits = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
  weights = rng.uniform(0.25, 1.25, ids.size)
  return ids, splits, weights


def _occurrence_gradient(ids, splits, weights, grad, combiner, rows):
  """Every valid occurrence's row index and gradient: its bag's gradient times its weight over
  the bag's divisor (the lookup's definition), in float64."""
  indices, rows_out = [], []
  for b in range(len(splits) - 1):
    bag = range(splits[b], splits[b + 1])
    valid = [j for j in bag if 0 <= ids[j] < rows]
    w = np.ones(len(ids)) if weights is None else weights.astype(np.float64)
    if combiner == "sum":
      divisor = 1.0
    elif combiner == "mean":
      divisor = sum(w[j] for j in valid)
    else:
      divisor = np.sqrt(sum(w[j] ** 2 for j in valid))
    if divisor == 0:
      continue
    for j in valid:
      indices.append(ids[j])
      rows_out.append(grad[b].astype(np.float64) * w[j] / divisor)
  return np.array(indices, np.int64), np.array(rows_out).reshape(-1, grad.shape[1])


def _hyper(rule, dtype):
  c = lambda x: tf.constant(x, dtype)  # pylint: disable=unnecessary-lambda-assignment
  if rule == "sgd":
    return [c(LR)]
  if rule in ("adagrad", "rowwise_adagrad"):
    return [c(LR), c(EPS)]
  rate = LR * np.sqrt(1 - BETA2) / (1 - BETA1)  # step 1
  return [c(rate), c(1 - BETA1), c(1 - BETA2), c(EPS)]


def _state(rule, rows, width, dtype, seed):
  rng = np.random.default_rng(seed)
  table = rng.uniform(-1, 1, (rows, width)).astype(dtype)
  shape = (rows, 1) if rule == "rowwise_adagrad" else (rows, width)
  slots = [rng.uniform(0.05, 1, shape).astype(dtype) for _ in range({"sgd": 0}.get(rule, 1))]
  if rule == "lazy_adam":
    slots = [rng.uniform(-1, 1, shape).astype(dtype), rng.uniform(0.05, 1, shape).astype(dtype)]
  return table, slots


def _fused(rule, variables, grad, ids, splits, weights, combiner, rows=None, bounds_check="error"):
  dtype = variables[0].dtype
  return _ops.de_sparse_apply_lookup_grad(
    [v.handle for v in variables],
    grad,
    ids,
    splits,
    tf.constant(variables[0].shape[0] if rows is None else rows, tf.int64),
    [] if weights is None else [tf.constant(weights, dtype)],
    _hyper(rule, dtype),
    rule=rule,
    combiner=combiner,
    bounds_check=bounds_check,
  )


class RawOpTest(test_util.TestCase):
  @parameterized.product(
    rule=RULES, weighted=(False, True), combiner=("sum", "mean", "sqrtn"), dtype=(np.float32,)
  )
  def test_matches_float64_reference_and_the_two_ops_it_replaces(
    self, rule, weighted, combiner, dtype
  ):
    rows, width = 300, 16
    ids, splits, weights = _bags(rows, 64, 12, seed=3)
    weights = weights.astype(dtype) if weighted else None
    grad = np.random.default_rng(4).uniform(-1, 1, (64, width)).astype(dtype)
    table, slots = _state(rule, rows, width, dtype, seed=5)

    fused = [tf.Variable(table)] + [tf.Variable(s) for s in slots]
    _fused(rule, fused, grad, ids, splits, weights, combiner)

    unfused = [tf.Variable(table)] + [tf.Variable(s) for s in slots]
    attrs = dict(combiner=combiner, T=tf.as_dtype(dtype))
    if weighted:
      unique, rows_grad = _ops.de_weighted_pooled_embedding_lookup_grad(
        grad, ids, splits, tf.constant(rows, tf.int64), weights, **attrs
      )
    else:
      unique, rows_grad = _ops.de_pooled_embedding_lookup_grad(
        grad, ids, splits, tf.constant(rows, tf.int64), **attrs
      )
    apply_raw(rule, unfused, unique, rows_grad)
    for f, u in zip(fused, unfused):
      self.assertAllEqual(u, f)

    indices, occurrence_grad = _occurrence_gradient(ids, splits, weights, grad, combiner, rows)
    want, want_slots = reference(rule, table, slots, indices, occurrence_grad)
    self.assertAllClose(want, fused[0], rtol=2e-5, atol=2e-5)
    for w, got in zip(want_slots, fused[1:]):
      self.assertAllClose(w, got, rtol=2e-5, atol=2e-5)

  @parameterized.parameters(("sgd", tf.int32, tf.int32), ("adagrad", tf.int64, tf.int32))
  def test_double_tables_and_narrow_indices(self, rule, id_dtype, split_dtype):
    rows, width = 50, 5
    ids, splits, _ = _bags(rows, 20, 6, seed=8)
    grad = np.random.default_rng(9).uniform(-1, 1, (20, width))
    table, slots = _state(rule, rows, width, np.float64, seed=10)
    variables = [tf.Variable(table)] + [tf.Variable(s) for s in slots]
    _fused(
      rule,
      variables,
      grad,
      tf.constant(ids, id_dtype),
      tf.constant(splits, split_dtype),
      None,
      "sum",
    )
    indices, occurrence_grad = _occurrence_gradient(ids, splits, None, grad, "sum", rows)
    want, _ = reference(rule, table, slots, indices, occurrence_grad)
    self.assertAllClose(want, variables[0], rtol=1e-12, atol=1e-12)

  def test_skipped_ids_update_nothing(self):
    rows, width = 40, 8
    ids, splits, _ = _bags(rows, 30, 5, seed=11, invalid=0.3)
    grad = np.random.default_rng(12).uniform(-1, 1, (30, width)).astype(np.float32)
    table, slots = _state("adagrad", rows, width, np.float32, seed=13)
    variables = [tf.Variable(table), tf.Variable(slots[0])]
    _fused("adagrad", variables, grad, ids, splits, None, "mean", bounds_check="skip")
    indices, occurrence_grad = _occurrence_gradient(ids, splits, None, grad, "mean", rows)
    want, want_slots = reference("adagrad", table, slots, indices, occurrence_grad)
    self.assertAllClose(want, variables[0], rtol=2e-5, atol=2e-5)
    self.assertAllClose(want_slots[0], variables[1], rtol=2e-5, atol=2e-5)

  def test_bad_input_is_named_and_writes_nothing(self):
    rows, width = 20, 4
    ids, splits, weights = _bags(rows, 10, 4, seed=14)
    ids[3] = 20
    grad = np.ones((10, width), np.float32)
    table, slots = _state("adagrad", rows, width, np.float32, seed=15)
    var, acc = tf.Variable(table), tf.Variable(slots[0])
    good_ids = np.minimum(ids, rows - 1)
    cases = [
      (dict(ids=ids), r"ids\[3\] = 20"),
      (dict(rows=rows + 1), r"'num_rows' must be the table's 20 rows; got 21"),
      (dict(grad=np.ones((10, width + 1), np.float32)), r"the table's width 4"),
      (dict(grad=np.ones((9, width), np.float32)), r"grad"),
      (dict(weights=weights[:-1].astype(np.float32)), r"weights"),
      (dict(splits=splits[::-1].copy()), r"row_splits"),
    ]
    for change, message in cases:
      args = dict(grad=grad, ids=good_ids, splits=splits, weights=None, rows=None)
      args.update(change)
      with self.assertRaisesRegex(tf.errors.InvalidArgumentError, message):
        _fused(
          "adagrad",
          [var, acc],
          args["grad"],
          args["ids"],
          args["splits"],
          args["weights"],
          "sum",
          rows=args["rows"],
        )
      self.assertAllEqual(table, var)
      self.assertAllEqual(slots[0], acc)

  def test_wrong_number_of_variables_or_hyperparameters_is_named(self):
    var = tf.Variable(np.zeros((5, 2), np.float32))
    args = (tf.ones((1, 2)), tf.constant([0], tf.int64), tf.constant([0, 1], tf.int64))
    rows = tf.constant(5, tf.int64)
    with self.assertRaisesRegex(
      (tf.errors.InvalidArgumentError, ValueError), r"rule 'adagrad' takes 2 variables"
    ):
      _ops.de_sparse_apply_lookup_grad(
        [var.handle],
        *args,
        rows,
        [],
        [tf.constant(0.1), tf.constant(EPS)],
        rule="adagrad",
        combiner="sum",
      )
    with self.assertRaisesRegex(
      (tf.errors.InvalidArgumentError, ValueError), r"rule 'sgd' takes 1 hyperparameters"
    ):
      _ops.de_sparse_apply_lookup_grad(
        [var.handle],
        *args,
        rows,
        [],
        [tf.constant(0.1), tf.constant(EPS)],
        rule="sgd",
        combiner="sum",
      )
    self.assertAllEqual(np.zeros((5, 2)), var)


def _fused_calls():
  """Patches the optimizers' fused path to record whether each sparse update took it."""
  calls = []
  original = sparse_updates._apply_from_lookup  # pylint: disable=protected-access

  def record(*args, **kwargs):
    calls.append(original(*args, **kwargs))
    return calls[-1]

  return calls, mock.patch.object(sparse_updates, "_apply_from_lookup", side_effect=record)


def _optimizer(name):
  base = {
    "SGD": lambda: keras.optimizers.SGD(0.05),
    "Adagrad": lambda: keras.optimizers.Adagrad(0.05),
    "RowwiseAdagrad": lambda: de.RowwiseAdagrad(0.05),
    "Adam": lambda: keras.optimizers.Adam(0.01),
  }[name]()
  return dmp.DistributedOptimizer(base, lazy_sparse_updates=name == "Adam")


class TwoTableModel(keras.Model):
  """Subclassed, never built by hand: two tables, one pooled by mean, one per id."""

  def __init__(self, rows, width):
    super().__init__()
    self.pooled = de.Embedding(rows, width, combiner="mean")
    self.per_id = de.Embedding(rows // 2, width)
    self.head = keras.layers.Dense(1)

  def call(self, ids):
    per_id = keras.ops.sum(self.per_id(ids % (self.per_id.input_dim)), axis=1)
    return self.head(keras.ops.concatenate([self.pooled(ids), per_id], axis=1))


def _train_step(var, optimizer, loss_of):
  """A custom training step as a tf.function: the loss's gradient applied to `var`."""

  @tf.function
  def step():
    with tf.GradientTape() as tape:
      loss = loss_of(var)
    optimizer.apply(tape.gradient(loss, [var]), [var])

  return step


class OptimizerTest(test_util.TestCase):
  def _fit(self, name, fused):
    rows, width, batch = 200, 8, 32
    rng = np.random.default_rng(16)
    ids = rng.integers(0, rows, (4 * batch, 5))
    y = rng.standard_normal((4 * batch, 1)).astype(np.float32)
    keras.utils.set_random_seed(2)
    model = TwoTableModel(rows, width)
    model.compile(optimizer=_optimizer(name), loss="mse")
    calls, patch = _fused_calls()
    env = {"DE_FUSED_LOOKUP_UPDATES": "1" if fused else "0"}
    with patch, mock.patch.dict(os.environ, env):
      model.fit(ids, y, batch_size=batch, epochs=2, shuffle=False, verbose=0)
    return [w.numpy() for w in model.weights], calls

  @parameterized.parameters("SGD", "Adagrad", "RowwiseAdagrad", "Adam")
  def test_model_fit_fuses_and_gives_the_unfused_numbers(self, name):
    fused, calls = self._fit(name, fused=True)
    unfused, unfused_calls = self._fit(name, fused=False)
    # Both tables, in every trace of the step.
    self.assertEqual([True] * len(calls), calls)
    self.assertEqual([False] * len(calls), unfused_calls)
    self.assertNotEmpty(calls)
    for want, got in zip(unfused, fused):
      self.assertAllEqual(want, got)

  def test_weighted_ragged_lookup_in_a_custom_step(self):
    rows, width = 100, 16
    ids, splits, weights = _bags(rows, 24, 6, seed=17)
    ragged = tf.RaggedTensor.from_row_splits(ids, splits)
    ragged_w = tf.RaggedTensor.from_row_splits(weights.astype(np.float32), splits)
    target = np.random.default_rng(18).uniform(-1, 1, (24, width)).astype(np.float32)
    table = np.random.default_rng(19).uniform(-1, 1, (rows, width)).astype(np.float32)
    results = []
    for fused in (True, False):
      var = keras.Variable(table)
      optimizer = dmp.DistributedOptimizer(keras.optimizers.SGD(LR))

      def loss_of(var):
        out = de.embedding_lookup(var, ragged, combiner="sqrtn", weights=ragged_w)
        return tf.reduce_sum(out * target)

      calls, patch = _fused_calls()
      with patch, mock.patch.dict(os.environ, {"DE_FUSED_LOOKUP_UPDATES": str(int(fused))}):
        _train_step(var, optimizer, loss_of)()
      self.assertEqual([fused], calls)
      results.append(var.numpy())
    self.assertAllEqual(results[1], results[0])
    indices, occurrence_grad = _occurrence_gradient(ids, splits, weights, target, "sqrtn", rows)
    want, _ = reference("sgd", table, [], indices, occurrence_grad)
    self.assertAllClose(want, results[0], rtol=2e-5, atol=2e-5)

  def test_changed_gradients_are_not_fused(self):
    """A table looked up twice (the tape sums the two gradients) or a clipped gradient: the update
    takes the IndexedSlices as they are."""
    rows, width = 50, 4
    ids = tf.constant(np.random.default_rng(20).integers(0, rows, (8, 3)))
    table = np.random.default_rng(21).uniform(-1, 1, (rows, width)).astype(np.float32)
    for twice, clip in ((True, None), (False, 1e-3)):
      var = keras.Variable(table)
      optimizer = dmp.DistributedOptimizer(keras.optimizers.SGD(LR, clipnorm=clip))

      def loss_of(var, twice=twice):
        loss = tf.reduce_sum(de.embedding_lookup(var, ids, combiner="sum"))
        if twice:
          loss += tf.reduce_sum(de.embedding_lookup(var, (ids + 1) % rows, combiner="mean"))
        return loss

      calls, patch = _fused_calls()
      with patch:
        _train_step(var, optimizer, loss_of)()
      self.assertEqual([False], calls)
      self.assertFalse(np.array_equal(table, var.numpy()))

  @parameterized.parameters(2, 3)
  def test_scaled_gradient_still_fuses(self, scale):
    """The sharded-table gradient of several workers is divided by their count: rebuilt from the
    scaled output gradient, it stays fusable, with the same values for a power of two."""
    rows, width = 60, 8
    ids = tf.constant(np.random.default_rng(22).integers(0, rows, (16, 4)))
    table = tf.Variable(np.random.default_rng(23).uniform(-1, 1, (rows, width)).astype(np.float32))
    target = tf.constant(np.random.default_rng(24).uniform(-1, 1, (16, width)).astype(np.float32))

    @tf.function
    def gradients():
      with tf.GradientTape() as tape:
        loss = tf.reduce_sum(de.embedding_lookup(table, ids, combiner="mean") * target)
      g = tape.gradient(loss, table)
      scaled = sparse_updates.scale_sparse_gradient(g, scale)
      self.assertIsNotNone(sparse_updates.lookup_gradient_op(scaled))
      return g.values / scale, scaled.values, g.indices, scaled.indices

    plain, scaled, plain_ids, scaled_ids = gradients()
    self.assertAllEqual(plain_ids, scaled_ids)
    if scale == 2:
      self.assertAllEqual(plain, scaled)
    else:
      self.assertAllClose(plain, scaled, rtol=1e-6, atol=1e-7)


if __name__ == "__main__":
  absltest.main()
