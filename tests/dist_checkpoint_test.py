"""Worker-count independent checkpoints: written by N workers, restored on M, training goes on
exactly as one worker would."""

import os

from absl.testing import absltest
from absl.testing import parameterized
import keras
import numpy as np
import tensorflow as tf

import distributed_embeddings as de
from distributed_embeddings import dist_model_parallel as dmp
from distributed_embeddings.python.parallel import communicator as comm_lib
import test_util

comm_lib.configure_logical_devices(4)

TABLES = [(40, 8), (30, 8), (64, 4), (12, 8), (90, 4)]
GLOBAL_BATCH = 8
MODE = dict(column_slice_threshold=150, row_slice_threshold=300, data_parallel_threshold=60)
# Row-wise Adagrad keeps one accumulator per row of each column slice (the mean over the slice's
# columns), so only a plan without column slices trains exactly as one worker does: a threshold
# no table reaches keeps the planner from slicing columns.
ROWWISE_MODE = dict(
  column_slice_threshold=10**9, row_slice_threshold=300, data_parallel_threshold=60
)


def _batch(step):
  rng = np.random.default_rng(200 + step)
  ids = [
    [list(rng.integers(0, r, size=rng.integers(0, 4))) for _ in range(GLOBAL_BATCH)]
    for r, _ in TABLES
  ]
  dense = rng.standard_normal((GLOBAL_BATCH, 3)).astype(np.float32)
  return ids, dense, rng.standard_normal((GLOBAL_BATCH, 1)).astype(np.float32)


def _build(comm, optimizer="adagrad", mode=None):
  rowwise = optimizer == "rowwise_adagrad"
  mode = mode or (ROWWISE_MODE if rowwise else MODE)
  layer = dmp.DistributedEmbedding(
    [de.Embedding(r, w, combiner="mean") for r, w in TABLES], communicator=comm, **mode
  )
  bottom = keras.layers.Dense(4, kernel_initializer=keras.initializers.Constant(0.1))
  top = keras.layers.Dense(1, kernel_initializer=keras.initializers.Constant(0.05))
  rng = np.random.default_rng(7)
  layer.build()
  layer.set_weights([rng.standard_normal(shape).astype(np.float32) for shape in TABLES])
  base = de.RowwiseAdagrad(0.3) if rowwise else keras.optimizers.Adagrad(0.3)
  return layer, bottom, top, dmp.DistributedOptimizer(base, comm)


def _train(parts, comm, steps):
  layer, bottom, top, optimizer = parts
  n, rank = comm.world_size, comm.rank
  local = slice(rank * GLOBAL_BATCH // n, (rank + 1) * GLOBAL_BATCH // n)
  for step in steps:
    ids, dense, target = _batch(step)
    feed = [tf.ragged.constant(x[local], dtype=tf.int64, ragged_rank=1) for x in ids]
    with tf.GradientTape() as tape:
      x = tf.concat(layer(feed) + [bottom(dense[local])], axis=1)
      loss = tf.reduce_mean((top(x) - target[local]) ** 2)
    variables = layer.trainable_variables + bottom.trainable_variables + top.trainable_variables
    optimizer.apply(tape.gradient(loss, variables), variables)


class _Model(keras.Model):
  """Holds the parts so the checkpoint helpers see one model."""

  def __init__(self, parts):
    super().__init__()
    self.embedding, self.bottom, self.top = parts[:3]


def _state(parts, comm):
  layer, bottom, top, optimizer = parts
  slots = layer.get_optimizer_slots(optimizer, all_ranks=True)
  return (
    layer.get_weights(all_ranks=True),
    [s for name in sorted(slots) for s in slots[name]],
    [v.numpy() for v in bottom.weights + top.weights],
    int(optimizer.iterations.numpy()),
  )


def _run(world_size, fn):
  if world_size == 1:
    return [fn(comm_lib.Communicator(0, 1))]
  return comm_lib.run_in_threads(world_size, fn)


class DistCheckpointTest(test_util.TestCase):
  @parameterized.parameters(
    (2, 4, "adagrad"),
    (4, 1, "adagrad"),
    (1, 2, "adagrad"),
    (2, 4, "rowwise_adagrad"),
    (4, 1, "rowwise_adagrad"),
    (1, 2, "rowwise_adagrad"),
  )
  def test_written_by_n_workers_restored_on_m(self, writers, readers, optimizer):
    path = os.path.join(self.create_tempdir().full_path, "ckpt.npz")

    def reference(comm):
      parts = _build(comm, optimizer)
      _train(parts, comm, range(4))
      return _state(parts, comm)

    def write(comm):
      parts = _build(comm, optimizer)
      _train(parts, comm, range(2))
      dmp.save_checkpoint(path, _Model(parts), parts[3], comm, metadata={"step": 2})

    def resume(comm):
      parts = _build(comm, optimizer)
      parts[1].build((None, 3))
      parts[2].build((None, sum(w for _, w in TABLES) + 4))
      # Fresh weights differ from the saved ones until the restore.
      parts[0].set_weights([np.zeros(shape, np.float32) for shape in TABLES])
      meta = dmp.restore_checkpoint(path, _Model(parts), parts[3])
      _train(parts, comm, range(meta["step"], 4))
      return _state(parts, comm)

    (expected,) = _run(1, reference)
    _run(writers, write)
    for tables, slots, dense, iterations in _run(readers, resume):
      self.assertEqual(expected[3], iterations)
      for got, want in zip(tables + slots + dense, expected[0] + expected[1] + expected[2]):
        self.assertAllClose(want, got, rtol=1e-5, atol=1e-6)
      self.assertLen(slots, len(TABLES))  # one accumulator per table
      if optimizer == "rowwise_adagrad":
        self.assertEqual([(r, 1) for r, _ in TABLES], [s.shape for s in slots])

  def test_rowwise_state_of_column_slices_is_their_width_weighted_mean(self):
    path = os.path.join(self.create_tempdir().full_path, "ckpt.npz")

    def write(comm):
      parts = _build(comm, "rowwise_adagrad", MODE)
      _train(parts, comm, range(2))
      layer, optimizer = parts[0], parts[3]
      # Each local slot holds the accumulators of this worker's shards, rows stacked.
      by_var = layer.optimizer_slot_variables(optimizer)["accumulator"]
      local = {}
      for shard, (var, offset) in zip(layer.local_shards, layer._slots):  # pylint: disable=protected-access
        value = by_var[id(var)].numpy()[offset : offset + shard.rows, 0]
        local[(shard.table, shard.row_begin, shard.col_begin)] = (shard, value)
      replicated = {
        t: by_var[id(var)].numpy()[:, 0]
        for t, var in layer._replicated_vars.items()  # pylint: disable=protected-access
      }
      dmp.save_checkpoint(path, _Model(parts), optimizer, comm)
      return local, replicated, [s.kind for s in layer.local_shards]

    results = _run(2, write)
    self.assertIn("column_slice", {k for _, _, kinds in results for k in kinds})
    expected = [np.zeros(r) for r, _ in TABLES]
    covered = [np.zeros(r) for r, _ in TABLES]
    replicated = set()
    for local, on_every_worker, _ in results:
      for t, value in on_every_worker.items():
        replicated.add(t)
        expected[t] = value
      for (t, _, _), (shard, value) in local.items():
        rows = slice(shard.row_begin, shard.row_begin + shard.rows)
        expected[t][rows] += value * shard.width / TABLES[t][1]
        covered[t][rows] += shard.width / TABLES[t][1]
    with np.load(path) as saved:
      for t in range(len(TABLES)):
        if t not in replicated:
          self.assertAllClose(np.ones(TABLES[t][0]), covered[t])
        got = saved[f"embedding/0/slot/accumulator/table{t}"]
        self.assertEqual((TABLES[t][0], 1), got.shape)
        self.assertAllClose(expected[t], got[:, 0], rtol=1e-6)

    # Restored on one worker, every row gets the saved value.
    comm = comm_lib.Communicator(0, 1)
    parts = _build(comm, "rowwise_adagrad", MODE)
    parts[1].build((None, 3))
    parts[2].build((None, sum(w for _, w in TABLES) + 4))
    dmp.restore_checkpoint(path, _Model(parts), parts[3])
    slots = parts[0].get_optimizer_slots(parts[3])["accumulator"]
    with np.load(path) as saved:
      for t in range(len(TABLES)):
        self.assertAllEqual(saved[f"embedding/0/slot/accumulator/table{t}"], slots[t])

  def test_per_worker_tf_train_checkpoint_round_trips(self):
    root = self.create_tempdir().full_path

    def save(comm):
      parts = _build(comm)
      _train(parts, comm, range(2))
      ckpt = tf.train.Checkpoint(model=_Model(parts), optimizer=parts[3])
      path = ckpt.write(os.path.join(root, f"rank{comm.rank}", "ckpt"))
      return path, _state(parts, comm)

    def load(comm, saved):
      parts = _build(comm)
      parts[1].build((None, 3))
      parts[2].build((None, sum(w for _, w in TABLES) + 4))
      parts[3].build(
        parts[0].trainable_variables + parts[1].trainable_variables + parts[2].trainable_variables
      )
      parts[0].set_weights([np.zeros(shape, np.float32) for shape in TABLES])
      tf.train.Checkpoint(model=_Model(parts), optimizer=parts[3]).read(
        saved[comm.rank][0]
      ).assert_consumed()
      return _state(parts, comm)

    saved = _run(2, save)
    for (_, before), after in zip(saved, _run(2, lambda comm: load(comm, saved))):
      self.assertEqual(before[3], after[3])
      for want, got in zip(before[0] + before[1] + before[2], after[0] + after[1] + after[2]):
        self.assertAllEqual(want, got)

  def test_optimizer_slots_must_match_the_optimizer(self):
    comm = comm_lib.Communicator(0, 1)
    layer, _, _, optimizer = _build(comm)
    slots = layer.get_optimizer_slots(optimizer)
    self.assertEqual(["accumulator"], sorted(slots))
    with self.assertRaisesRegex(ValueError, r"has slots \['accumulator'\]; got \['momentum'\]"):
      layer.set_optimizer_slots(optimizer, {"momentum": slots["accumulator"]})
    with self.assertRaisesRegex(ValueError, r"table 2 must be \(64, 4\); got \(3, 3\)"):
      layer.set_optimizer_slots(
        optimizer,
        {
          "accumulator": slots["accumulator"][:2]
          + [np.zeros((3, 3), np.float32)]
          + slots["accumulator"][3:]
        },
      )

  def test_restore_rejects_another_model(self):
    path = os.path.join(self.create_tempdir().full_path, "ckpt.npz")
    comm = comm_lib.Communicator(0, 1)
    parts = _build(comm)
    _train(parts, comm, range(1))
    dmp.save_checkpoint(path, _Model(parts), parts[3], comm)
    other = _build(comm)
    other[1].build((None, 5))
    other[2].build((None, 42))
    with self.assertRaisesRegex(ValueError, r"weight/0 .* has shape \(3, 4\)"):
      dmp.restore_checkpoint(path, _Model(other), other[3])


if __name__ == "__main__":
  absltest.main()
