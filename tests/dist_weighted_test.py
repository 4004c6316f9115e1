"""Weighted bags through DistributedEmbedding: every placement, 2 and 4 workers (threads on
logical CPU devices) against one worker training the same global batch, one worker against
NumPy, and weights that do not match their ids failing on every worker."""

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np
import tensorflow as tf

import distributed_embeddings as de
from distributed_embeddings.python.layers import dist_model_parallel as dmp
from distributed_embeddings.python.parallel import communicator as comm_lib
import dist_case
import test_util

comm_lib.configure_logical_devices(4)

TABLES, GLOBAL_BATCH = dist_case.TABLES, dist_case.GLOBAL_BATCH
COMBINER_OF_MODE = {
  "table_wise": "mean",
  "column_sliced": "sqrtn",
  "row_sliced": "mean",
  "data_parallel": "sqrtn",
  "mixed": "sqrtn",
  "shared_tables": "sum",
  "model_parallel_input": "mean",
}


def _weights_like(ids, seed):
  """Per-id weights with the structure of dist_case.inputs' ids: mostly in [0.25, 1.25), a
  tenth exactly zero (so some bags have only zero weights)."""
  rng = np.random.default_rng(seed)

  def draw(n):
    w = 0.25 + rng.random(n)
    w[rng.random(n) < 0.1] = 0.0
    return w.astype(np.float32)

  if isinstance(ids, np.ndarray):
    return draw(ids.size).reshape(ids.shape)
  return [list(draw(len(bag))) for bag in ids]


def _feed_weights(weights, rows, id_format):
  if id_format == "dense":
    return tf.constant(weights[rows])
  ragged = tf.ragged.constant(weights[rows], dtype=tf.float32, ragged_rank=1)
  return ragged if id_format == "ragged" else ragged.to_sparse()


def _train(comm, mode, combiner, id_format, steps=2, lr=0.5, compiled=False):
  """This worker's (first-step outputs, tables after `steps` SGD steps) with weighted inputs."""
  input_table_map = mode.get("input_table_map", list(range(len(TABLES))))
  tables, coefs = dist_case.initial_state(input_table_map)
  batches = []
  for s in range(steps):
    ids = dist_case.inputs(100 + s, input_table_map, id_format)
    batches.append((ids, [_weights_like(x, 1000 * s + i) for i, x in enumerate(ids)]))
  layer = dmp.DistributedEmbedding(
    [de.Embedding(r, w, combiner=combiner) for r, w in TABLES], communicator=comm, **mode
  )
  layer.build()
  layer.set_weights(tables)
  n, rank = comm.world_size, comm.rank
  local = slice(rank * GLOBAL_BATCH // n, (rank + 1) * GLOBAL_BATCH // n)

  def step(feed, weights):
    with tf.GradientTape() as tape:
      outs = layer(feed, weights=weights)
      loss = sum(
        tf.reduce_sum(tf.reshape(o, [tf.shape(o)[0], -1])[:, : c.shape[1]] * c[local])
        for o, c in zip(outs, coefs)
      ) / (GLOBAL_BATCH // n)
    variables = layer.trainable_variables
    grads = dmp.DistributedGradientTape(tape, comm).gradient(loss, variables)
    dist_case.sgd_apply(variables, grads, lr)
    return outs

  if compiled:
    step = tf.function(step)
  first = None
  for ids, weights in batches:
    if layer.dp_input:
      picked = list(range(len(ids)))
      rows = local
    else:
      picked = layer.local_input_indices
      rows = slice(None)
    feed = [dist_case.feed_ids(ids[i], rows, id_format) for i in picked]
    feed_weights = [_feed_weights(weights[i], rows, id_format) for i in picked]
    outs = step(feed, feed_weights)
    if first is None:
      first = [o.numpy() for o in outs]
  return first, layer.get_weights(all_ranks=True)


class DistributedWeightedTest(test_util.TestCase):
  @parameterized.product(mode=sorted(COMBINER_OF_MODE), id_format=["dense", "ragged", "sparse"])
  def test_workers_train_like_one_worker(self, mode, id_format):
    config = dist_case.MODES[mode]
    if id_format != "dense" and not config.get("dp_input", True):
      self.skipTest("dp_input=False inputs without a combiner are one-hot; these have one")
    combiner = COMBINER_OF_MODE[mode]
    ((ref_first, ref_tables),) = comm_lib.run_in_threads(
      1, lambda comm: _train(comm, config, combiner, id_format)
    )
    n = 4 if mode == "mixed" else 2
    results = comm_lib.run_in_threads(
      n, lambda comm: _train(comm, config, combiner, id_format, compiled=mode == "mixed")
    )
    local = GLOBAL_BATCH // n
    for rank, (first, tables) in enumerate(results):
      for ref, out in zip(ref_first, first):
        self.assertAllClose(ref[rank * local : (rank + 1) * local], out, rtol=1e-5, atol=1e-6)
      for ref, table in zip(ref_tables, tables):
        self.assertAllClose(ref, table, rtol=1e-5, atol=1e-6)

  def test_one_worker_matches_numpy(self):
    rng = np.random.default_rng(3)
    tables = [rng.standard_normal(shape) for shape in TABLES]
    ids = dist_case.inputs(5, list(range(len(TABLES))), "ragged")
    weights = [_weights_like(x, i) for i, x in enumerate(ids)]
    for combiner in ("sum", "mean", "sqrtn"):
      layer = dmp.DistributedEmbedding(
        [de.Embedding(r, w, combiner=combiner) for r, w in TABLES], dtype="float64"
      )
      layer.build()
      layer.set_weights(tables)
      outs = layer(
        [dist_case.feed_ids(x, slice(None), "ragged") for x in ids],
        weights=[tf.ragged.constant(w, dtype=tf.float64, ragged_rank=1) for w in weights],
      )
      for t, out in enumerate(outs):
        expected = np.zeros((GLOBAL_BATCH, TABLES[t][1]))
        for b, (bag, w) in enumerate(zip(ids[t], weights[t])):
          w = np.asarray(w, np.float64)
          total = (w[:, None] * tables[t][np.asarray(bag, np.int64)]).sum(0) if bag else 0.0
          divisor = {"sum": 1.0, "mean": w.sum(), "sqrtn": np.sqrt((w * w).sum())}[combiner]
          expected[b] = total / divisor if divisor else 0.0
        self.assertAllClose(expected, out, rtol=1e-12, atol=1e-12)

  def test_one_worker_weights_get_a_gradient(self):
    layer = dmp.DistributedEmbedding([de.Embedding(10, 3, combiner="sum")])
    layer.build()
    w = tf.constant([[0.5, 2.0]])
    with tf.GradientTape() as tape:
      tape.watch(w)
      total = tf.reduce_sum(layer([tf.constant([[1, 4]])], weights=[w])[0])
    table = layer.get_weights()[0]
    self.assertAllClose(tape.gradient(total, w), [[table[1].sum(), table[4].sum()]])

  @parameterized.parameters(False, True)
  def test_weights_unlike_their_ids_fail_on_every_worker(self, traced):
    def work(comm):
      layer = dmp.DistributedEmbedding(
        [de.Embedding(r, w, combiner="mean") for r, w in TABLES[:2]], communicator=comm
      )
      layer.build()
      ids = tf.ragged.constant([[1, 2], [3]], dtype=tf.int64)
      # Worker 1's weights split its bags differently from its ids.
      splits = [0, 2, 3] if comm.rank == 0 else [0, 1, 3]
      w = tf.RaggedTensor.from_row_splits(tf.ones([3]), tf.constant(splits, tf.int64))
      call = lambda: layer([ids, ids], weights=[None, w])  # noqa: E731
      if traced:
        call = tf.function(call)
      try:
        call()
      except (tf.errors.InvalidArgumentError, ValueError) as e:
        return str(e)
      return None

    for message in comm_lib.run_in_threads(2, work):
      self.assertIsNotNone(message)
      self.assertIn("input 1 on worker 1 is malformed", message)
      self.assertIn("weights must have the structure of their ids", message)

  def test_weights_argument_is_checked(self):
    layer = dmp.DistributedEmbedding([de.Embedding(10, 3, combiner="sum")])
    layer.build()
    with self.assertRaisesRegex(ValueError, "one entry \\(None or a tensor\\) per input"):
      layer([tf.constant([[1]])], weights=[None, None])
    with self.assertRaisesRegex(TypeError, "'weights' must be a floating-point tensor"):
      layer([tf.constant([[1]])], weights=[tf.constant([[1]])])


if __name__ == "__main__":
  absltest.main()
