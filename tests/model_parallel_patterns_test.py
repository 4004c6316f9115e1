"""Model parallelism the ways Keras 3 users build and train models, against one worker.

Each case trains on 2 or 4 workers (threads on logical CPU devices) and, as the reference, the
same model of plain Keras layers in one process on the global batch (model_parallel_case.py).
No model here is built by hand: Keras builds each in its first call, symbolically.
"""

from absl.testing import absltest
from absl.testing import parameterized
import keras
import numpy as np
import tensorflow as tf

from distributed_embeddings import dist_model_parallel as dmp
from distributed_embeddings.python.parallel import communicator as comm_lib
from distributed_embeddings.python.training import sparse_updates
import model_parallel_case as mpc
import test_util

comm_lib.configure_logical_devices(4)

Case = mpc.Case
TWO = [[6, 6], [6, 6]]
CASES = {
  "subclassed_table_wise": Case(dict(), TWO),
  "subclassed_traced_with_a_partial_batch": Case(dict(), [[6, 6], [6, 6], [2, 2]], graph=True),
  "local_batches_that_differ": Case(dict(), [[7, 5], [3, 9]], graph=True),
  "a_worker_with_an_empty_batch": Case(
    dict(row_slice_threshold=200), [[0, 6], [6, 0], [3, 3]], graph=True
  ),
  "column_slices": Case(dict(column_slice_threshold=30), TWO),
  "row_slices": Case(dict(row_slice_threshold=1), TWO),
  "data_parallel": Case(dict(data_parallel_threshold=100000), TWO),
  "all_placements_mixed": Case(
    dict(
      strategy="memory_balanced",
      column_slice_threshold=60,
      row_slice_threshold=300,
      data_parallel_threshold=40,
    ),
    [[4, 2, 3, 3], [1, 2, 3, 4]],
    graph=True,
  ),
  "model_parallel_input_one_hot": Case(dict(dp_input=False), TWO),
  "model_parallel_input_traced": Case(
    dict(dp_input=False, strategy="memory_balanced"), [[6, 6], [4, 4]], graph=True
  ),
  "model_parallel_input_multi_hot": Case(
    dict(dp_input=False, column_slice_threshold=60),
    TWO,
    kind="ours",
    combiner="sum",
    id_format="dense",
  ),
  "multi_hot_sum": Case(
    dict(column_slice_threshold=40), TWO, kind="ours", combiner="sum", id_format="dense"
  ),
  "multi_hot_without_combiner": Case(dict(row_slice_threshold=100), TWO, id_format="dense"),
  "ragged_mean": Case(
    dict(row_slice_threshold=100, data_parallel_threshold=40),
    [[6, 6], [5, 3]],
    kind="ours",
    combiner="mean",
    id_format="ragged",
    graph=True,
  ),
  "sparse_sum": Case(
    dict(row_slice_threshold=100), TWO, kind="ours", combiner="sum", id_format="sparse"
  ),
  "shared_tables": Case(
    dict(strategy="memory_optimized"), TWO, input_table_map=[0, 1, 2, 3, 4, 5, 6, 0, 3, 3]
  ),
  "functional": Case(
    dict(column_slice_threshold=40),
    TWO,
    model="functional",
    id_format="dense",
    kind="ours",
    combiner="sum",
  ),
  "functional_model_parallel_input": Case(dict(dp_input=False), TWO, model="functional"),
  "sequential": Case(dict(row_slice_threshold=200), TWO, model="sequential"),
  "custom_embedding_layer": Case(dict(), TWO, kind="custom"),
  "mixed_precision": Case(dict(row_slice_threshold=100), TWO, policy="mixed_float16"),
  "more_workers_than_tables": Case(dict(), [[3, 3, 3, 3], [2, 2, 2, 2]], tables=((30, 8),)),
}


class TrainsLikeOneWorkerTest(test_util.TestCase):
  @parameterized.named_parameters(*CASES.items())
  def test_trains_like_one_worker(self, case):
    expected_outputs, expected_tables, expected_dense, _ = mpc.train(
      case, comm_lib.Communicator(0, 1), distributed=False
    )
    results = comm_lib.run_in_threads(case.world_size, lambda comm: mpc.train(case, comm))
    tol = dict(rtol=2e-2, atol=2e-2) if case.policy else dict(rtol=1e-5, atol=1e-5)
    for rank, (outputs, tables, dense, sharded) in enumerate(results):
      for step, out in enumerate(outputs):
        self.assertAllClose(expected_outputs[step][mpc.local_rows(case, rank, step)], out, **tol)
      for got, want in zip(tables + dense, expected_tables + expected_dense):
        self.assertAllClose(want, got, **tol)
      # Each worker owns its shards (model parallel) unless every table is replicated.
      replicated = case.distribute.get("data_parallel_threshold", 0) > max(
        r * w for r, w in case.tables
      )
      self.assertEqual(not replicated, any(sharded))


class ShardIdentityTest(test_util.TestCase):
  """Shards are recognised as model parallel however Keras created their variables."""

  @parameterized.parameters("subclassed", "functional", "sequential")
  def test_shards_are_model_parallel_after_keras_builds_the_model(self, model_kind):
    case = Case(dict(data_parallel_threshold=40), TWO, model=model_kind)

    def work(comm):
      model, dist, dense = mpc.build_model(case, comm)
      ids = mpc.global_ids(case, 0)
      model(mpc.feed_for(case, dist, ids, comm.rank, 0))  # the first call builds it
      shards = dist.sharded_variables()
      inner = [sparse_updates.backing_variable(v) for v in shards]
      return (
        [dmp.is_model_parallel(v) for v in shards + inner],
        [getattr(v, "de_local", False) for v in shards + inner],
        [dmp.is_model_parallel(v) for v in dense.weights],
        [
          dmp.is_model_parallel(dist._replicated_vars[t])  # pylint: disable=protected-access
          for t in dist.plan.data_parallel_tables
        ],
        len(shards),
      )

    for flags, marks, dense_flags, replicated_flags, count in comm_lib.run_in_threads(2, work):
      self.assertGreater(count, 0)
      self.assertTrue(all(flags), flags)
      self.assertTrue(all(marks), marks)
      self.assertFalse(any(dense_flags))
      self.assertTrue(replicated_flags)
      self.assertFalse(any(replicated_flags))


def _fit_data(case, rank=None):
  """(inputs, targets) of every step of `case`, concatenated: worker `rank`'s rows, or all."""
  xs, ys = [], []
  for step in range(len(case.batches)):
    rows = mpc.local_rows(case, rank, step) if rank is not None else slice(None)
    ids = mpc.global_ids(case, step)
    xs.append([x[rows] for x in ids])
    ys.append(mpc.targets(case, step)[rows])
  return [np.concatenate([x[i] for x in xs]) for i in range(len(xs[0]))], np.concatenate(ys)


class ModelFitTest(test_util.TestCase):
  @parameterized.parameters("subclassed", "functional")
  def test_fit_matches_one_worker(self, model_kind):
    # Local batches of 4, 4 and a partial 2: model.fit retraces for the last one.
    case = Case(
      dict(row_slice_threshold=200, column_slice_threshold=60),
      [[4, 4], [4, 4], [2, 2]],
      model=model_kind,
      lr=0.1,
    )
    tables, kernel, bias = mpc.initial_weights(case)

    def fit(comm, distributed):
      model, dist, dense = mpc.build_model(case, comm, distributed)
      x, y = _fit_data(case, comm.rank if distributed else None)
      model(
        mpc.feed_for(case, dist, mpc.global_ids(case, 0), comm.rank, 0)
        if distributed
        else [tf.constant(v[:2]) for v in x]
      )
      if distributed:
        dist.set_weights(tables)
        optimizer = dmp.DistributedOptimizer(keras.optimizers.SGD(case.lr), comm)
      else:
        for t, layer in enumerate(model.embeddings):
          layer.set_weights([tables[t]])
        optimizer = keras.optimizers.SGD(case.lr)
      dense.set_weights([kernel, bias])
      model.compile(optimizer=optimizer, loss="mse")
      history = model.fit(
        x, y, batch_size=4 if distributed else 8, epochs=2, shuffle=False, verbose=0
      )
      weights = (
        dist.get_weights(all_ranks=True)
        if distributed
        else [layer.get_weights()[0] for layer in model.embeddings]
      )
      return weights + [w.numpy() for w in dense.weights], history.history["loss"]

    expected, _ = fit(comm_lib.Communicator(0, 1), False)
    for got, _ in comm_lib.run_in_threads(2, lambda comm: fit(comm, True)):
      for g, e in zip(got, expected):
        self.assertAllClose(e, g, rtol=1e-5, atol=1e-5)

  def test_broadcast_callback_gives_every_worker_the_same_model(self):
    # As the reference's test: different dense weights per worker at first; after one batch
    # with the callback the outputs agree, and so do the losses of the next fit.
    tables = [(11, 7), (5, 8), (3, 8), (5, 8), (12, 25), (3, 12), (7, 13)]

    def work(comm):
      keras.utils.set_random_seed(comm.rank)
      case = Case(dict(), TWO, tables=tables)
      model, _, _ = mpc.build_model(case, comm)
      ids = [tf.constant(np.arange(3) % r) for r, _ in tables]  # the same on every worker
      model.compile(
        optimizer=keras.optimizers.SGD(1.5), loss=keras.losses.BinaryCrossentropy(from_logits=True)
      )
      y = tf.fill([3, mpc.OUT_UNITS], 0.3)
      first = model.fit(
        ids,
        y,
        epochs=1,
        steps_per_epoch=1,
        verbose=0,
        callbacks=[dmp.BroadcastGlobalVariablesCallback(0, comm)],
      )
      out = model(ids).numpy()
      second = model.fit(ids, y, epochs=1, steps_per_epoch=1, verbose=0)
      return first.history["loss"][0], out, second.history["loss"][0]

    (loss0, out0, next0), (loss1, out1, next1) = comm_lib.run_in_threads(2, work)
    self.assertNotAlmostEqual(loss0, loss1, places=4)
    self.assertAllClose(out0, out1, rtol=0, atol=0)
    self.assertAllClose(next0, next1, rtol=1e-6)


if __name__ == "__main__":
  absltest.main()
