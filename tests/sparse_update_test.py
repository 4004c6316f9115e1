"""The fused sparse optimizer updates: raw ops against NumPy in float64, the Keras-facing
optimizers against stock Keras (bit for bit where the rule is Keras's), RowwiseAdagrad in a
model trained with `fit` and reloaded in a fresh process, bad input, and locking."""

import os
import subprocess
import sys
import textwrap
import threading
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
import test_util

_ops = embedding_lookup_ops._ops  # pylint: disable=protected-access

from sparse_rules import EPS, LR, RULES
from sparse_rules import apply_raw as _apply
from sparse_rules import make_case as _case
from sparse_rules import reference as _reference


class RawOpTest(test_util.TestCase):
  @parameterized.product(
    rule=RULES, dtype=(np.float32, np.float64), index_dtype=(np.int32, np.int64)
  )
  def test_matches_float64_reference(self, rule, dtype, index_dtype):
    table, slots, indices, grad = _case(rule, 300, 12, 400, dtype, seed=1)  # many repeats
    variables = [tf.Variable(table)] + [tf.Variable(s) for s in slots]
    for step in (1, 2):
      want, want_slots = _reference(
        rule, variables[0].numpy(), [v.numpy() for v in variables[1:]], indices, grad, step
      )
      _apply(rule, variables, tf.constant(indices.astype(index_dtype)), tf.constant(grad), step)
      tol = 1e-5 if dtype == np.float32 else 1e-12
      self.assertAllClose(want, variables[0], rtol=tol, atol=tol)
      for want_slot, got in zip(want_slots, variables[1:]):
        self.assertAllClose(want_slot, got, rtol=tol, atol=tol)

  def test_rowwise_accepts_a_vector_accumulator(self):
    table, slots, indices, grad = _case("rowwise_adagrad", 50, 8, 30, np.float32, seed=2)
    variables = [tf.Variable(table), tf.Variable(slots[0][:, 0])]
    want, want_slots = _reference("rowwise_adagrad", table, slots, indices, grad)
    _apply("rowwise_adagrad", variables, tf.constant(indices), tf.constant(grad))
    self.assertAllClose(want, variables[0], rtol=1e-5)
    self.assertAllClose(want_slots[0][:, 0], variables[1], rtol=1e-5)

  def test_in_a_tf_function_with_a_learning_rate_variable(self):
    table, _, indices, grad = _case("sgd", 40, 4, 10, np.float32, seed=3)
    var, lr = tf.Variable(table), tf.Variable(0.5)

    @tf.function
    def step():
      _ops.de_sparse_apply_sgd(var.handle, indices, grad, lr)

    step()
    lr.assign(0.25)
    step()
    want = table.astype(np.float64)
    for scale in (0.5, 0.25):
      np.subtract.at(want, indices, scale * grad.astype(np.float64))
    self.assertAllClose(want, var, rtol=1e-6)

  def test_bad_index_is_named_and_writes_nothing(self):
    for rule in RULES:
      table, slots, indices, grad = _case(rule, 20, 4, 6, np.float32, seed=4)
      indices[3] = 20
      variables = [tf.Variable(table)] + [tf.Variable(s) for s in slots]
      with self.assertRaisesRegex(
        tf.errors.InvalidArgumentError, r"'indices' must lie in \[0, 20\); got indices\[3\] = 20"
      ):
        _apply(rule, variables, tf.constant(indices), tf.constant(grad))
      self.assertAllEqual(table, variables[0])
      for want, got in zip(slots, variables[1:]):
        self.assertAllEqual(want, got)

  def test_malformed_inputs_are_named(self):
    table, slots, indices, grad = _case("adagrad", 20, 4, 6, np.float32, seed=5)
    var, acc = tf.Variable(table), tf.Variable(slots[0])
    lr, eps = tf.constant(LR), tf.constant(EPS)
    apply = _ops.de_sparse_apply_adagrad
    cases = [
      ((var.handle, acc.handle, indices, grad[:, :3], lr, eps), r"'grad' must have the table's "),
      ((var.handle, acc.handle, indices, grad[:5], lr, eps), r"'grad' must be \[len\(indices\)"),
      ((var.handle, acc.handle, indices[:, None], grad, lr, eps), r"'indices' must be 1-D"),
      ((var.handle, acc.handle, indices, grad, [LR, LR], eps), r"'learning_rate' must be a scalar"),
      ((var.handle, var.handle, indices, grad, lr, eps), r"'var' and 'accumulator' must be differ"),
      (
        (var.handle, tf.Variable(slots[0][:10]).handle, indices, grad, lr, eps),
        r"'accumulator' must have shape \[20,4\]",
      ),
      (
        (var.handle, tf.Variable(slots[0].astype(np.float64)).handle, indices, grad, lr, eps),
        r"'accumulator' must hold float; got double",
      ),
    ]
    for args, pattern in cases:
      with self.assertRaisesRegex((tf.errors.InvalidArgumentError, ValueError), pattern):
        apply(*args)
    self.assertAllEqual(table, var)
    self.assertAllEqual(slots[0], acc)
    with self.assertRaisesRegex(tf.errors.InvalidArgumentError, r"'accumulator' must have shape"):
      _ops.de_sparse_apply_rowwise_adagrad(
        var.handle, acc.handle, indices, grad, lr, eps
      )  # a full-size accumulator is not per row

  def test_a_value_read_before_the_update_keeps_its_value(self):
    table, _, indices, grad = _case("sgd", 30, 4, 5, np.float32, seed=6, distinct=True)
    var = tf.Variable(table)
    before = embedding_lookup_ops.read_var_no_copy(var)  # shares the buffer
    _apply("sgd", [var], tf.constant(indices), tf.constant(grad))
    self.assertAllEqual(table, before)
    want = table.copy()
    want[indices] -= grad * np.float32(LR)
    self.assertAllEqual(want, var)

  def test_lookups_never_see_a_row_half_updated(self):
    # Every update adds the same value to a whole row, so any row a lookup returns is constant
    # unless the lookup read it while the update was writing it.
    width, rows = 512, 64
    var = tf.Variable(np.zeros((rows, width), np.float32))
    indices = tf.range(rows, dtype=tf.int64)
    grad = tf.ones([rows, width])
    ids = tf.reshape(tf.range(rows, dtype=tf.int64), [rows, 1])
    torn = []

    def update():
      for _ in range(300):
        _ops.de_sparse_apply_sgd(var.handle, indices, grad, tf.constant(1.0))

    def look_up():
      for _ in range(300):
        out = de.embedding_lookup(var, ids, combiner="sum").numpy()
        if not (out == out[:, :1]).all():
          torn.append(out)

    threads = [threading.Thread(target=update), threading.Thread(target=look_up)]
    for t in threads:
      t.start()
    for t in threads:
      t.join()
    self.assertEmpty(torn)
    self.assertAllEqual(np.full((rows, width), -300.0), var)


def _gradient(indices, values, shape):
  return tf.IndexedSlices(tf.constant(values), tf.constant(indices), tf.constant(shape, tf.int64))


class OptimizerTest(test_util.TestCase):
  @parameterized.parameters(
    ("SGD", {}, False),
    ("Adagrad", {}, False),
    ("Adam", {}, True),
    ("Adam", {"amsgrad": True}, True),
  )
  def test_distinct_ids_give_keras_bit_for_bit(self, name, kwargs, lazy):
    rng = np.random.default_rng(7)
    table = rng.uniform(-1, 1, (60, 8)).astype(np.float32)
    results = []
    for ours in (False, True):
      var = keras.Variable(table)
      optimizer = getattr(keras.optimizers, name)(0.1, **kwargs)
      if ours:
        optimizer = dmp.DistributedOptimizer(optimizer, lazy_sparse_updates=lazy)
      # The same rows every step: Adam's untouched rows have zero moments and stay put.
      indices = rng.permutation(60)[:20] if not results else results[0][1]
      for step in range(3):
        values = np.random.default_rng(step).uniform(-1, 1, (20, 8)).astype(np.float32)
        optimizer.apply([_gradient(indices, values, [60, 8])], [var])
      results.append((var.numpy(), indices))
    self.assertAllEqual(results[0][0], results[1][0])

  @parameterized.parameters("SGD", "Adagrad")
  def test_model_fit_matches_stock_keras_bit_for_bit(self, name):
    """A subclassed model, never built by hand, trained with fit on batches of distinct ids."""
    rows, width, batch = 64, 8, 16

    class Model(keras.Model):
      def __init__(self, embedding):
        super().__init__()
        self.embedding = embedding
        self.head = keras.layers.Dense(1, kernel_initializer="ones")

      def call(self, ids):
        return self.head(keras.ops.reshape(self.embedding(ids), (-1, 2 * width)))

    rng = np.random.default_rng(8)
    ids = np.concatenate([rng.permutation(rows)[: 2 * batch].reshape(batch, 2) for _ in range(4)])
    y = rng.standard_normal((4 * batch, 1)).astype(np.float32)
    weights = []
    for ours in (False, True):
      keras.utils.set_random_seed(1)
      if ours:
        model = Model(de.Embedding(rows, width))
        optimizer = dmp.DistributedOptimizer(getattr(keras.optimizers, name)(0.05))
      else:
        model = Model(keras.layers.Embedding(rows, width))
        optimizer = getattr(keras.optimizers, name)(0.05)
      model.compile(optimizer=optimizer, loss="mse")
      model.fit(ids, y, batch_size=batch, epochs=2, shuffle=False, verbose=0)
      weights.append([w.numpy() for w in model.weights])
    for stock, fused in zip(*weights):
      self.assertAllEqual(stock, fused)

  @parameterized.parameters("sgd", "adagrad", "rowwise_adagrad", "lazy_adam")
  def test_tensorflow_fallback_follows_the_same_rule(self, rule):
    """Tables our kernels do not take (on a GPU) get the rule as TensorFlow ops."""
    table, _, indices, grad = _case(rule, 50, 6, 80, np.float32, seed=9)
    results = []
    for fused in (True, False):
      var = keras.Variable(table)
      sparse_updates.mark_embedding_table(var)
      base = {
        "sgd": lambda: keras.optimizers.SGD(LR),
        "adagrad": lambda: keras.optimizers.Adagrad(LR, epsilon=EPS),
        "rowwise_adagrad": lambda: de.RowwiseAdagrad(LR, epsilon=EPS),
        "lazy_adam": lambda: keras.optimizers.Adam(LR, epsilon=EPS),
      }[rule]()
      optimizer = dmp.DistributedOptimizer(base, lazy_sparse_updates=rule == "lazy_adam")
      with mock.patch.object(sparse_updates, "fused_update_available", return_value=fused):
        for _ in range(2):
          optimizer.apply([_gradient(indices, grad, [50, 6])], [var])
      results.append(var.numpy())
    self.assertAllClose(results[0], results[1], rtol=1e-6, atol=1e-7)


def _rowwise_model(rows, width):
  inputs = keras.Input((3,), dtype="int64")
  pooled = de.Embedding(rows, width, combiner="sum", name="table")(inputs)
  outputs = keras.layers.Dense(1, kernel_initializer="ones", name="head")(pooled)
  return keras.Model(inputs, outputs)


class RowwiseAdagradTest(test_util.TestCase):
  def test_state_is_one_value_per_table_row(self):
    model = keras.Sequential(
      [keras.Input((2,), dtype="int64"), de.Embedding(100, 16), keras.layers.Flatten()]
      + [keras.layers.Dense(3)]
    )
    stock = keras.layers.Embedding(30, 4)
    stock.build((None,))
    optimizer = de.RowwiseAdagrad(0.1)
    optimizer.build(model.trainable_variables + stock.trainable_variables)
    shapes = [tuple(a.shape) for a in optimizer._accumulators]  # pylint: disable=protected-access
    self.assertEqual([(100, 1), (32, 3), (3,), (30, 4)], shapes)

  def test_fit_matches_a_numpy_reference(self):
    rows, width, batch, steps = 40, 6, 8, 4
    model = _rowwise_model(rows, width)
    table0 = model.get_layer("table").embeddings.numpy().astype(np.float64)
    rng = np.random.default_rng(10)
    ids = rng.integers(0, rows, (batch * steps, 3))  # repeats within and across bags
    y = rng.standard_normal((batch * steps, 1))
    model.compile(optimizer=de.RowwiseAdagrad(0.2, epsilon=EPS), loss="mse")
    model.fit(ids, y.astype(np.float32), batch_size=batch, shuffle=False, verbose=0)

    table, acc_t = table0.copy(), np.full((rows, 1), 0.1)
    kernel, acc_k = np.ones((width, 1)), np.full((width, 1), 0.1)
    bias, acc_b = np.zeros(1), np.full(1, 0.1)
    for s in range(steps):
      x, target = ids[s * batch : (s + 1) * batch], y[s * batch : (s + 1) * batch]
      pooled = table[x].sum(axis=1)
      d_out = 2 * (pooled @ kernel + bias - target) / batch
      g_kernel, g_bias, d_pooled = pooled.T @ d_out, d_out.sum(0), d_out @ kernel.T
      g_table = np.zeros_like(table)
      for b in range(batch):
        for i in x[b]:
          g_table[i] += d_pooled[b]
      touched = np.unique(x)
      acc_t[touched, 0] += np.mean(g_table[touched] ** 2, axis=1)
      table[touched] -= 0.2 * g_table[touched] / np.sqrt(acc_t[touched] + EPS)
      for param, acc, grad in ((kernel, acc_k, g_kernel), (bias, acc_b, g_bias)):
        acc += grad**2
        param -= 0.2 * grad / np.sqrt(acc + EPS)
    self.assertAllClose(table, model.get_layer("table").embeddings, rtol=1e-5, atol=1e-6)
    self.assertAllClose(kernel, model.get_layer("head").kernel, rtol=1e-5, atol=1e-6)
    accumulators = model.optimizer._accumulators  # pylint: disable=protected-access
    self.assertAllClose(acc_t, accumulators[0], rtol=1e-5)

  def test_keras_file_and_tf_checkpoint_resume_in_a_fresh_process(self):
    tmp = self.create_tempdir().full_path
    rng = np.random.default_rng(11)
    ids = rng.integers(0, 50, (64, 3))
    y = rng.standard_normal((64, 1)).astype(np.float32)
    np.savez(os.path.join(tmp, "data.npz"), ids=ids, y=y)
    model = _rowwise_model(50, 4)
    model.compile(optimizer=de.RowwiseAdagrad(0.1), loss="mse")
    model.fit(ids[:32], y[:32], batch_size=8, shuffle=False, verbose=0)
    model.save(os.path.join(tmp, "model.keras"))
    tf.train.Checkpoint(model=model, optimizer=model.optimizer).write(os.path.join(tmp, "ckpt"))
    model.fit(ids[32:], y[32:], batch_size=8, shuffle=False, verbose=0)
    expected = [w.numpy() for w in model.weights + model.optimizer.variables]

    script = textwrap.dedent(f"""
        import os, keras, numpy as np, tensorflow as tf
        import distributed_embeddings as de
        import sparse_update_test as case
        tmp = {tmp!r}
        data = np.load(os.path.join(tmp, "data.npz"))
        loaded = keras.models.load_model(os.path.join(tmp, "model.keras"))
        assert isinstance(loaded.optimizer, de.RowwiseAdagrad), type(loaded.optimizer)
        loaded.fit(data["ids"][32:], data["y"][32:], batch_size=8, shuffle=False, verbose=0)
        restored = case._rowwise_model(50, 4)
        restored.compile(optimizer=de.RowwiseAdagrad(0.1), loss="mse")
        restored.optimizer.build(restored.trainable_variables)
        tf.train.Checkpoint(model=restored, optimizer=restored.optimizer).read(
            os.path.join(tmp, "ckpt")).assert_consumed()
        restored.fit(data["ids"][32:], data["y"][32:], batch_size=8, shuffle=False, verbose=0)
        for name, m in (("keras", loaded), ("ckpt", restored)):
          np.savez(os.path.join(tmp, name + ".npz"),
                   *[w.numpy() for w in m.weights + m.optimizer.variables])
        """)
    env = dict(
      os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p), TF_CPP_MIN_LOG_LEVEL="3"
    )
    env.pop("PYTHONSAFEPATH", None)
    subprocess.run([sys.executable, "-c", script], check=True, env=env)
    for name in ("keras", "ckpt"):
      with np.load(os.path.join(tmp, name + ".npz")) as resumed:
        self.assertLen(resumed.files, len(expected))
        for i, value in enumerate(expected):
          np.testing.assert_array_equal(value, resumed[f"arr_{i}"], err_msg=f"{name} {i}")


if __name__ == "__main__":
  absltest.main()
