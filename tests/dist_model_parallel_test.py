"""DistributedEmbedding with 2 and 4 workers against one worker training the same global batch.

Workers are threads on logical CPU devices (also run by MirroredStrategy), communicating with
TensorFlow's collective ops.
"""

import time
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import keras
import numpy as np
import tensorflow as tf

import distributed_embeddings as de
from distributed_embeddings.python.layers import dist_embedding
from distributed_embeddings.python.layers import dist_model_parallel as dmp
from distributed_embeddings.python.parallel import communicator as comm_lib
import dist_case
import test_util

comm_lib.configure_logical_devices(4)

TABLES, GLOBAL_BATCH, HOTNESS, MODES = (
  dist_case.TABLES,
  dist_case.GLOBAL_BATCH,
  dist_case.HOTNESS,
  dist_case.MODES,
)
# What the old per-mode training cases covered is in model_parallel_patterns_test.py, trained the
# ways users build models; this file tests the layer's own behaviour.
_inputs, _feed = dist_case.inputs, dist_case.feed_ids


class DistributedEmbeddingTest(test_util.TestCase):
  def test_ragged_ids_of_a_sharded_table_need_a_combiner(self):
    def work(comm):
      layer = dmp.DistributedEmbedding([de.Embedding(r, w) for r, w in TABLES], communicator=comm)
      feed = [tf.ragged.constant([[1], [2, 3]], dtype=tf.int64)] * len(TABLES)
      with self.assertRaisesRegex(ValueError, r"ragged or sparse input 0 .* combiner"):
        layer(feed)

    comm_lib.run_in_threads(2, work)

  @parameterized.parameters(1, 2)
  def test_same_width_tables_are_one_variable_and_one_lookup(self, world_size):
    # Six width-8 tables and one width-4 table; inputs dense of two hotnesses and ragged.
    shapes = [(40, 8), (25, 8), (60, 8), (33, 8), (12, 8), (70, 8), (20, 4)]
    rng = np.random.default_rng(11)
    weights = [rng.standard_normal(shape).astype(np.float32) for shape in shapes]
    ids = [rng.integers(0, r, size=(8, 1 + t % 2)) for t, (r, _) in enumerate(shapes)]
    ids[2] = [list(rng.integers(0, shapes[2][0], size=n)) for n in (0, 3, 1, 5, 2, 0, 4, 1)]
    formats = ["ragged" if t == 2 else "dense" for t in range(len(shapes))]

    def work(comm):
      layer = dmp.DistributedEmbedding(
        [de.Embedding(r, w, combiner="mean") for r, w in shapes], communicator=comm
      )
      layer.build()
      layer.set_weights(weights)
      local = slice(comm.rank * 8 // comm.world_size, (comm.rank + 1) * 8 // comm.world_size)
      feed = [_feed(x, local, f) for x, f in zip(ids, formats)]
      graph = tf.function(layer.call).get_concrete_function(feed).graph
      lookups = sum(op.type == "DeResourcePooledEmbeddingLookup" for op in graph.get_operations())
      widths = sorted(v.shape[1] for v in layer.trainable_variables)
      return [o.numpy() for o in layer(feed)], lookups, widths

    results = (
      [work(comm_lib.Communicator(0, 1))]
      if world_size == 1
      else comm_lib.run_in_threads(world_size, work)
    )
    local = 8 // world_size
    for rank, (outs, lookups, widths) in enumerate(results):
      # One variable and one lookup per width on each worker.
      self.assertEqual(sorted(set(widths)), widths)
      self.assertEqual(len(widths), lookups)
      for t, o in enumerate(outs):
        bags = ids[t][rank * local : (rank + 1) * local]
        expected = [weights[t][b].mean(0) if len(b) else np.zeros(shapes[t][1]) for b in bags]
        self.assertAllClose(np.array(expected), o, rtol=1e-5)

  def test_stacked_variables_stop_growing_at_the_cap(self):
    # Cap 100 elements: 10x4 + 10x4 share one variable, 20x4 would pass the cap and starts the
    # next, 30x4 is over the cap alone; the 8-wide table has its own width.
    shapes = [(10, 4), (10, 4), (20, 4), (30, 4), (5, 8)]
    self.enter_context(mock.patch.object(dist_embedding, "_MAX_FUSED_ELEMENTS", 100))
    layer = dmp.DistributedEmbedding([de.Embedding(r, w, combiner="sum") for r, w in shapes])
    layer.build()
    self.assertEqual(
      [(20, 4), (20, 4), (30, 4), (5, 8)], [tuple(v.shape) for v in layer.trainable_variables]
    )
    rng = np.random.default_rng(3)
    weights = [rng.standard_normal(shape).astype(np.float32) for shape in shapes]
    layer.set_weights(weights)
    ids = [rng.integers(0, r, (6, 3)) for r, _ in shapes]
    for t, out in enumerate(layer([tf.constant(x) for x in ids])):
      self.assertAllClose(weights[t][ids[t]].sum(1), out, rtol=1e-6)
    for t, w in enumerate(layer.get_weights()):
      self.assertAllEqual(weights[t], w)

  def test_fused_tables_reject_ids_of_their_neighbours(self):
    layer = dmp.DistributedEmbedding(
      [de.Embedding(10, 4, combiner="sum"), de.Embedding(10, 4, combiner="sum")]
    )
    layer.build()
    before = [w.copy() for w in layer.get_weights()]
    for bad in ([[10]], [[-1]]):
      with self.assertRaisesRegex(tf.errors.InvalidArgumentError, "ids of input 0 must be"):
        layer([tf.constant(bad), tf.constant([[0]])])
    with self.assertRaisesRegex(tf.errors.InvalidArgumentError, "ids of input 1 must be < 10"):
      layer([tf.constant([[0]]), tf.ragged.constant([[3, 12]])])
    for w, b in zip(layer.get_weights(), before):
      self.assertAllEqual(b, w)

  @parameterized.parameters("mixed", "shared_tables")
  def test_inside_mirrored_strategy_run(self, mode_name):
    # The logical-device harness with MirroredStrategy as the replica runner: one layer per
    # replica (its shards differ, so they are not mirrored variables), picked by replica id
    # inside strategy.run, trained in a tf.function against one worker.
    n, steps, lr = 2, 3, 0.5
    mode = MODES[mode_name]
    input_table_map = mode.get("input_table_map", list(range(len(TABLES))))
    ref_out, ref_tables = dist_case.train_worker(
      comm_lib.Communicator(0, 1), mode, "mean", steps=steps, lr=lr
    )
    weights, coefs = dist_case.initial_state(input_table_map)
    devices = [f"/cpu:{r}" for r in range(n)]
    group = comm_lib.new_group_key()
    layers = []
    for rank, device in enumerate(devices):
      with tf.device(device):
        layer = dmp.DistributedEmbedding(
          [de.Embedding(r, w, combiner="mean") for r, w in TABLES],
          communicator=comm_lib.Communicator(rank, n, group, device),
          **mode,
        )
        layer.build()
        layers.append(layer)
    comm_lib.run_in_threads(n, lambda comm: layers[comm.rank].set_weights(weights))
    strategy = tf.distribute.MirroredStrategy(devices)
    local = GLOBAL_BATCH // n

    def replica_step(*feed):
      context = tf.distribute.get_replica_context()
      rank = context._replica_id_in_sync_group  # pylint: disable=protected-access
      layer = layers[rank]
      with tf.GradientTape() as tape:
        outs = layer(list(feed))
        loss = (
          sum(tf.reduce_sum(o * c[rank * local : (rank + 1) * local]) for o, c in zip(outs, coefs))
          / local
        )
      variables = layer.trainable_variables
      dist_case.sgd_apply(
        variables,
        dmp.DistributedGradientTape(tape, layer.communicator).gradient(loss, variables),
        lr,
      )
      return tf.concat(outs, axis=1)

    step = tf.function(lambda *feed: strategy.run(replica_step, args=feed))
    first = None
    for s in range(steps):
      ids = _inputs(100 + s, input_table_map)
      feed = [
        strategy.experimental_distribute_values_from_function(
          lambda ctx, x=x: tf.constant(
            x[ctx.replica_id_in_sync_group * local : (ctx.replica_id_in_sync_group + 1) * local]
          )
        )
        for x in ids
      ]
      out = strategy.experimental_local_results(step(*feed))
      first = first if first is not None else [o.numpy() for o in out]
    expected = np.concatenate(ref_out, axis=1)
    for rank in range(n):
      self.assertAllClose(
        expected[rank * local : (rank + 1) * local], first[rank], rtol=1e-5, atol=1e-6
      )
    for tables in comm_lib.run_in_threads(
      n, lambda comm: layers[comm.rank].get_weights(all_ranks=True)
    ):
      for t, r in zip(tables, ref_tables):
        self.assertAllClose(r, t, rtol=1e-5, atol=1e-6)

  def test_forward_matches_numpy(self):
    rng = np.random.default_rng(3)
    weights = [rng.standard_normal(shape).astype(np.float32) for shape in TABLES]
    ids = _inputs(5, list(range(len(TABLES))))

    def work(comm):
      layer = dmp.DistributedEmbedding(
        [de.Embedding(r, w, combiner="sum") for r, w in TABLES],
        communicator=comm,
        column_slice_threshold=100,
      )
      layer.build()
      layer.set_weights(weights)
      local = slice(comm.rank * 4, comm.rank * 4 + 4)
      return [o.numpy() for o in layer([tf.constant(x[local]) for x in ids])]

    for rank, outs in enumerate(comm_lib.run_in_threads(2, work)):
      for t, o in enumerate(outs):
        self.assertAllClose(weights[t][ids[t][rank * 4 : rank * 4 + 4]].sum(1), o, rtol=1e-6)

  def test_weights_move_between_worker_counts(self):
    rng = np.random.default_rng(4)
    weights = [rng.standard_normal(shape).astype(np.float32) for shape in TABLES]

    def roundtrip(world_size, mode, tables):
      def work(comm):
        layer = dmp.DistributedEmbedding(
          [de.Embedding(r, w) for r, w in TABLES], communicator=comm, **mode
        )
        layer.build()
        layer.set_weights(tables)
        return layer.get_weights(all_ranks=True)

      if world_size == 1:
        return [work(comm_lib.Communicator(0, 1))]
      return comm_lib.run_in_threads(world_size, work)

    from_four = roundtrip(4, MODES["mixed"], weights)
    for tables in from_four:
      for t, w in zip(tables, weights):
        self.assertAllEqual(w, t)
    on_two = roundtrip(2, MODES["column_sliced"], from_four[0])
    on_one = roundtrip(1, {}, on_two[1])
    for t, w in zip(on_one[0], weights):
      self.assertAllEqual(w, t)

  def test_set_weights_from_npy_files_in_small_chunks(self):
    rng = np.random.default_rng(6)
    weights = [rng.standard_normal(shape).astype(np.float32) for shape in TABLES]
    paths = []
    for t, w in enumerate(weights):
      paths.append(self.create_tempfile(f"table{t}.npy").full_path)
      np.save(paths[-1], w)

    def work(comm):
      layer = dmp.DistributedEmbedding(
        [de.Embedding(r, w) for r, w in TABLES], communicator=comm, **MODES["mixed"]
      )
      layer.build()
      layer.set_weights(paths, chunk=7, use_lock=True)  # 7 elements: many partial writes
      with self.assertRaisesRegex(ValueError, "'chunk' must be a positive integer; got 0"):
        layer.set_weights(paths, chunk=0)
      return layer.get_weights(all_ranks=True)

    for tables in comm_lib.run_in_threads(2, work):
      for t, w in zip(tables, weights):
        self.assertAllEqual(w, t)

  def test_global_batch_must_divide_among_workers(self):
    def work(comm):
      layer = dmp.DistributedEmbedding(
        [de.Embedding(r, w, combiner="sum") for r, w in TABLES], communicator=comm, dp_input=False
      )
      feed = [tf.zeros([7, HOTNESS[i]], tf.int64) for i in layer.local_input_indices]
      with self.assertRaisesRegex(
        ValueError, r"global batch \(7\) is not divisible by the number of workers"
      ):
        layer(feed)

    comm_lib.run_in_threads(2, work)

  @parameterized.parameters(1, 2)
  def test_one_dimensional_ids_are_bags_of_one(self, world_size):
    # The reference API's one-hot inputs: [batch] ids give [batch, width], with or without a
    # combiner.
    rng = np.random.default_rng(7)
    weights = [rng.standard_normal(shape).astype(np.float32) for shape in TABLES]
    ids = [rng.integers(0, r, size=8) for r, _ in TABLES]
    combiners = [None, "sum", None, "mean", None]

    def work(comm):
      layer = dmp.DistributedEmbedding(
        [de.Embedding(r, w, combiner=c) for (r, w), c in zip(TABLES, combiners)], communicator=comm
      )
      layer.build()
      layer.set_weights(weights)
      local = slice(comm.rank * 8 // comm.world_size, (comm.rank + 1) * 8 // comm.world_size)
      return [o.numpy() for o in layer([tf.constant(x[local]) for x in ids])]

    results = (
      [work(comm_lib.Communicator(0, 1))]
      if world_size == 1
      else comm_lib.run_in_threads(world_size, work)
    )
    local = 8 // world_size
    for rank, outs in enumerate(results):
      for t, o in enumerate(outs):
        self.assertAllClose(weights[t][ids[t][rank * local : (rank + 1) * local]], o, rtol=1e-6)

  def test_higher_rank_dense_ids_on_one_worker(self):
    rng = np.random.default_rng(8)
    weights = [rng.standard_normal(shape).astype(np.float32) for shape in TABLES[:2]]
    ids = [rng.integers(0, r, size=(3, 2, 4)) for r, _ in TABLES[:2]]
    layer = dmp.DistributedEmbedding(
      [de.Embedding(*TABLES[0]), de.Embedding(*TABLES[1], combiner="mean")]
    )
    layer.build()
    layer.set_weights(weights)
    unpooled, pooled = layer([tf.constant(x) for x in ids])
    self.assertAllClose(weights[0][ids[0]], unpooled, rtol=1e-6)
    self.assertAllClose(weights[1][ids[1]].mean(axis=2), pooled, rtol=1e-6)

  def test_outputs_come_in_the_compute_dtype(self):
    rng = np.random.default_rng(9)
    weights = [rng.standard_normal(shape).astype(np.float32) for shape in TABLES]
    layer = dmp.DistributedEmbedding(
      [de.Embedding(r, w, combiner="sum") for r, w in TABLES], dtype="mixed_float16"
    )
    layer.build()
    layer.set_weights(weights)
    ids = _inputs(4, list(range(len(TABLES))))
    for t, out in enumerate(layer([tf.constant(x) for x in ids])):
      self.assertEqual(tf.float16, out.dtype)
      self.assertAllClose(weights[t][ids[t]].sum(1), out, rtol=2e-3, atol=2e-3)
    self.assertTrue(all(v.dtype == tf.float32 for v in layer.trainable_variables))

  def test_reference_api_names(self):
    layers = [de.Embedding(r, w, combiner="sum") for r, w in TABLES]

    def work(comm):
      layer = dmp.DistributedEmbedding(layers, communicator=comm, dp_input=False)
      strategy = layer.strategy
      # Every table's inputs are fed to the workers holding it, each table once per worker.
      self.assertEqual(layer.local_input_indices, strategy.input_ids_list[comm.rank])
      for tables in strategy.table_ids:
        self.assertEqual(len(set(tables)), len(tables))
      self.assertEqual(
        sorted(range(len(TABLES))), sorted(t for tables in strategy.table_ids for t in tables)
      )
      tables = layer.get_weights(True)
      v = tf.Variable(tf.fill([3], float(comm.rank)))
      dmp.broadcast_variables([v], root_rank=1, communicator=comm)
      return [t.shape for t in tables], v.numpy()

    for shapes, broadcast in comm_lib.run_in_threads(2, work):
      self.assertEqual([tuple(shape) for shape in TABLES], [tuple(s) for s in shapes])
      self.assertAllEqual([1.0, 1.0, 1.0], broadcast)

  def test_set_weights_needs_a_built_layer_and_shards_are_marked(self):
    # As in the reference API: no weights to set before build; shard variables carry de_local.
    def work(comm):
      layer = dmp.DistributedEmbedding(
        [de.Embedding(r, w) for r, w in TABLES], communicator=comm, data_parallel_threshold=100
      )
      with self.assertRaisesRegex(ValueError, "set_weights: .* is not built yet"):
        layer.set_weights([np.zeros(shape, np.float32) for shape in TABLES])
      layer.build()
      return [(getattr(v, "de_local", False), dmp.is_model_parallel(v)) for v in layer.weights]

    # One worker holds every table as its own. With two, table 3 (10 x 8 = 80 elements) is
    # replicated: not local, not model-parallel.
    one = work(comm_lib.Communicator(0, 1))
    self.assertEqual([(True, False)] * len(one), one)
    for marks in comm_lib.run_in_threads(2, work):
      self.assertEqual([(True, True)] * (len(marks) - 1) + [(False, False)], marks)

  def test_distributed_optimizer_reference_api(self):
    sgd = keras.optimizers.SGD(0.5)
    wrapped = dmp.DistributedOptimizer(
      sgd,
      name="opt",
      device_dense="/cpu:0",
      device_sparse="",
      sparse_as_dense=True,
      compression=None,
      backward_passes_per_step=1,
      average_aggregated_gradients=True,
    )
    # A new optimizer of the same class and config; the given one is left as it was.
    self.assertIsNot(sgd, wrapped)
    self.assertIs(keras.optimizers.SGD, type(sgd))
    self.assertIsInstance(wrapped, keras.optimizers.SGD)
    self.assertEqual(sgd.get_config(), wrapped.get_config())
    for kwargs, error, text in (
      (dict(compression="fp16"), ValueError, "'compression' is not supported"),
      (dict(backward_passes_per_step=2), ValueError, "'backward_passes_per_step' must be 1"),
      (dict(gradient_predivide_factor=2.0), ValueError, "'gradient_predivide_factor'"),
      (dict(communicator="nccl"), TypeError, "'communicator' must be a Communicator"),
    ):
      with self.assertRaisesRegex(error, text):
        dmp.DistributedOptimizer(keras.optimizers.SGD(0.5), **kwargs)
    with self.assertRaisesRegex(TypeError, "'optimizer' must be a Keras optimizer"):
      dmp.DistributedOptimizer("sgd")
    used = keras.optimizers.SGD(0.5)
    used.build([keras.Variable(np.zeros(2, np.float32))])
    with self.assertRaisesRegex(ValueError, "already been used"):
      dmp.DistributedOptimizer(used)

    def work(comm):
      v = keras.Variable(np.zeros(3, np.float32))
      optimizer = dmp.DistributedOptimizer(keras.optimizers.SGD(0.5), comm)
      optimizer.apply([tf.constant([1.0, 2.0, 3.0]) * (comm.rank + 1)], [v])
      return v.numpy()

    # Worker gradients g and 2g average to 1.5g.
    for value in comm_lib.run_in_threads(2, work):
      self.assertAllClose(-0.5 * 1.5 * np.array([1.0, 2.0, 3.0]), value)

  def test_distributed_adagrad_updates_only_the_touched_rows(self):
    rows, width, lr, initial, epsilon = 40, 3, 0.1, 0.1, 1e-7
    rng = np.random.default_rng(7)
    start = rng.normal(size=(rows, width)).astype(np.float32)
    # Ids repeat within a step (shared tables, or stock Embedding gradients): Adagrad squares the
    # summed gradient of a row, not each piece.
    steps = [
      (rng.integers(0, rows // 2, size=12), rng.normal(size=(12, width)).astype(np.float32))
      for _ in range(4)
    ]

    table = keras.Variable(start)
    bias = keras.Variable(np.ones(2, np.float32))
    optimizer = dmp.DistributedOptimizer(
      keras.optimizers.Adagrad(lr, initial_accumulator_value=initial, epsilon=epsilon),
      comm_lib.Communicator(0, 1),
    )

    @tf.function
    def step(ids, values):
      grad = tf.IndexedSlices(values, ids, tf.constant([rows, width], tf.int64))
      optimizer.apply([grad, tf.constant([1.0, -2.0])], [table, bias])

    for ids, values in steps:
      step(tf.constant(ids, tf.int64), tf.constant(values))

    # Float64 reference of the Adagrad rule on the dense (summed) gradient.
    ref, acc = start.astype(np.float64), np.full((rows, width), initial)
    ref_bias, acc_bias = np.ones(2), np.full(2, initial)
    for ids, values in steps:
      grad = np.zeros((rows, width))
      np.add.at(grad, ids, values.astype(np.float64))
      acc += grad * grad
      ref -= lr * grad / np.sqrt(acc + epsilon)
      acc_bias += np.array([1.0, 4.0])
      ref_bias -= lr * np.array([1.0, -2.0]) / np.sqrt(acc_bias + epsilon)
    self.assertAllClose(ref, table.numpy(), rtol=1e-5, atol=1e-6)
    self.assertAllClose(ref_bias, bias.numpy(), rtol=1e-5, atol=1e-6)
    self.assertAllEqual(start[rows // 2 :], table.numpy()[rows // 2 :])  # never touched
    accumulators = {v.path: v.numpy() for v in optimizer.variables if v.shape == (rows, width)}
    self.assertLen(accumulators, 1)
    self.assertAllClose(acc, next(iter(accumulators.values())), rtol=1e-5, atol=1e-6)

    # No op in the step works on the whole table: the table's update is one fused sparse op.
    ids, values = steps[0]
    graph = step.get_concrete_function(tf.constant(ids, tf.int64), tf.constant(values)).graph
    types = [op.type for op in graph.get_operations()]
    self.assertEqual(1, types.count("DeSparseApplyAdagrad"))
    sqrt_shapes = [
      op.outputs[0].shape.as_list() for op in graph.get_operations() if op.type in ("Sqrt", "Rsqrt")
    ]
    self.assertNotIn([rows, width], sqrt_shapes)

    # Float16 gradient pieces (mixed precision) are summed in the table's float32: 2049 + 1
    # pieces of 1.0 would stay at 2048 in float16.
    table = keras.Variable(np.zeros((2, 1), np.float32))
    optimizer = dmp.DistributedOptimizer(
      keras.optimizers.Adagrad(1.0, epsilon=0.0), comm_lib.Communicator(0, 1)
    )
    optimizer.apply(
      [
        tf.IndexedSlices(
          tf.ones([2050, 1], tf.float16), tf.zeros([2050], tf.int64), tf.constant([2, 1], tf.int64)
        )
      ],
      [table],
    )
    accumulator = [v for v in optimizer.variables if v.shape == (2, 1)][0]
    self.assertAllClose([[0.1 + 2050.0**2], [0.1]], accumulator.numpy(), rtol=1e-6)

  def test_distributed_adagrad_equals_keras_adagrad_on_unique_ids(self):
    # Each id once per gradient, as our lookups' gradients have them: Keras's own whole-table
    # update and the rows-only one give the same table and accumulator, bit for bit (eagerly),
    # also with clipping, int32 ids and an empty gradient.
    rng = np.random.default_rng(3)
    start = rng.normal(size=(30, 4)).astype(np.float32)
    steps = [rng.permutation(30)[:n] for n in (12, 0, 7, 20)]
    values = [rng.normal(size=(len(ids), 4)).astype(np.float32) for ids in steps]

    def train(wrap, index_dtype):
      table = keras.Variable(start)
      optimizer = keras.optimizers.Adagrad(0.3, clipnorm=2.0, epsilon=1e-3)
      if wrap:
        optimizer = dmp.DistributedOptimizer(optimizer, comm_lib.Communicator(0, 1))
      for ids, vals in zip(steps, values):
        optimizer.apply(
          [
            tf.IndexedSlices(
              tf.constant(vals), tf.constant(ids, index_dtype), tf.constant([30, 4], index_dtype)
            )
          ],
          [table],
        )
      (accumulator,) = [v.numpy() for v in optimizer.variables if v.shape == (30, 4)]
      return table.numpy(), accumulator

    for index_dtype in (tf.int32, tf.int64):
      keras_table, keras_accumulator = train(False, index_dtype)
      ours_table, ours_accumulator = train(True, index_dtype)
      self.assertAllEqual(keras_table, ours_table)
      self.assertAllEqual(keras_accumulator, ours_accumulator)
      self.assertFalse(np.array_equal(start, ours_table))

  def test_lazy_adam_updates_only_the_touched_rows(self):
    rows, width, lr, b1, b2, eps = 20, 3, 0.05, 0.8, 0.9, 1e-4
    rng = np.random.default_rng(11)
    start = rng.normal(size=(rows, width)).astype(np.float32)
    # Ids repeat within a step, and rows 15-19 never get a gradient.
    steps = [
      (rng.integers(0, 15, size=9), rng.normal(size=(9, width)).astype(np.float32))
      for _ in range(5)
    ]

    for amsgrad in (False, True):
      table = keras.Variable(start)
      optimizer = dmp.DistributedOptimizer(
        keras.optimizers.Adam(lr, beta_1=b1, beta_2=b2, epsilon=eps, amsgrad=amsgrad),
        comm_lib.Communicator(0, 1),
        lazy_sparse_updates=True,
      )
      step = tf.function(
        lambda ids, values: optimizer.apply(
          [tf.IndexedSlices(values, ids, tf.constant([rows, width], tf.int64))], [table]
        )
      )
      for ids, values in steps:
        step(tf.constant(ids, tf.int64), tf.constant(values))

      # Float64 reference: summed gradient per row; a row's moments move only when it has one.
      ref, m, v = start.astype(np.float64), np.zeros((rows, width)), np.zeros((rows, width))
      v_hat = np.zeros((rows, width))
      for t, (ids, values) in enumerate(steps, start=1):
        grad = np.zeros((rows, width))
        np.add.at(grad, ids, values.astype(np.float64))
        touched = np.unique(ids)
        g = grad[touched]
        m[touched] += (g - m[touched]) * (1 - b1)
        v[touched] += (g * g - v[touched]) * (1 - b2)
        v_hat[touched] = np.maximum(v_hat[touched], v[touched])
        alpha = lr * np.sqrt(1 - b2**t) / (1 - b1**t)
        denominator = np.sqrt(v_hat[touched] if amsgrad else v[touched]) + eps
        ref[touched] -= m[touched] * alpha / denominator
      self.assertAllClose(ref, table.numpy(), rtol=1e-5, atol=1e-6)
      self.assertAllEqual(start[15:], table.numpy()[15:])
      moments = {
        v.path.rsplit("/", 1)[-1].split("_")[-1]: v.numpy()
        for v in optimizer.variables
        if v.shape == (rows, width)
      }
      self.assertAllClose(m, moments["momentum"], rtol=1e-5, atol=1e-7)
      self.assertAllClose(v, moments["velocity"], rtol=1e-5, atol=1e-7)

  def test_lazy_adam_equals_keras_adam_when_every_row_has_a_gradient(self):
    rng = np.random.default_rng(5)
    start = rng.normal(size=(16, 4)).astype(np.float32)
    steps = [(rng.permutation(16), rng.normal(size=(16, 4)).astype(np.float32)) for _ in range(4)]

    def train(lazy):
      table = keras.Variable(start)
      optimizer = keras.optimizers.Adam(0.01, amsgrad=True)
      if lazy:
        optimizer = dmp.DistributedOptimizer(
          optimizer, comm_lib.Communicator(0, 1), lazy_sparse_updates=True
        )
      for ids, values in steps:
        optimizer.apply(
          [
            tf.IndexedSlices(
              tf.constant(values), tf.constant(ids, tf.int64), tf.constant([16, 4], tf.int64)
            )
          ],
          [table],
        )
      return table.numpy()

    self.assertAllEqual(train(False), train(True))

  def test_lazy_sparse_updates_arguments(self):
    with self.assertRaisesRegex(
      ValueError,
      r"'lazy_sparse_updates' is supported for \['Adam'\]; "
      r"got SGD",
    ):
      dmp.DistributedOptimizer(keras.optimizers.SGD(0.1, momentum=0.9), lazy_sparse_updates=True)
    with self.assertRaisesRegex(TypeError, "'lazy_sparse_updates' must be a bool; got 'yes'"):
      dmp.DistributedOptimizer(keras.optimizers.Adam(), lazy_sparse_updates="yes")

  def test_distributed_optimizer_keeps_dense_rules_of_other_optimizers(self):
    # Adam's Keras update decays the moments of every row, touched or not: left as Keras has it.
    def train(optimizer):
      table = keras.Variable(np.arange(12, dtype=np.float32).reshape(6, 2))
      for ids in ([0, 1], [2, 2], [5, 0]):
        grad = tf.IndexedSlices(
          tf.ones([2, 2]), tf.constant(ids, tf.int64), tf.constant([6, 2], tf.int64)
        )
        optimizer.apply([grad], [table])
      return table.numpy()

    stock = train(keras.optimizers.Adam(0.1))
    self.assertAllEqual(stock, train(dmp.DistributedOptimizer(keras.optimizers.Adam(0.1))))
    # Row 1 has a gradient in the first step only, a step of lr; its momentum moves it on.
    self.assertTrue(np.all(np.array([2.0, 3.0]) - stock[1] > 0.11), stock[1])

  def test_distributed_gradient_tape_reference_api(self):
    with self.assertRaisesRegex(ValueError, "'compression' is not supported"):
      dmp.DistributedGradientTape(tf.GradientTape(), compression="fp16")

    def work(comm):
      a, b = tf.Variable([1.0, 2.0]), tf.Variable(3.0)
      with tf.GradientTape() as tape:
        loss = (comm.rank + 1.0) * (tf.reduce_sum(a * a) + b)
      tape = dmp.DistributedGradientTape(tape, comm, device_dense="", sparse_as_dense=False)
      self.assertEqual(2, len(tape.watched_variables()))  # other tape methods pass through
      grads = tape.gradient(loss, {"a": a, "rest": [b]}, output_gradients=tf.constant(2.0))
      return grads["a"].numpy(), grads["rest"][0].numpy()

    # d/da = 2 * (rank + 1) * 2a, d/db = 2 * (rank + 1); averaged over ranks 0 and 1: x 1.5.
    for grad_a, grad_b in comm_lib.run_in_threads(2, work):
      self.assertAllClose(2 * 1.5 * 2 * np.array([1.0, 2.0]), grad_a)
      self.assertAllClose(2 * 1.5, grad_b)

  def test_broadcast_callback_after_the_first_batch(self):
    # As the reference callback: at the end of the first batch, root's model and optimizer
    # variables everywhere, except the sharded tables and their slots; never again after that.
    def work(comm):
      inputs = [keras.Input(shape=(h,), dtype="int64") for h in HOTNESS]
      layer = dmp.DistributedEmbedding(
        [de.Embedding(r, w, combiner="sum") for r, w in TABLES], communicator=comm
      )
      dense = keras.layers.Dense(1, kernel_initializer=keras.initializers.Constant(comm.rank + 1.0))
      model = keras.Model(inputs, dense(keras.layers.Concatenate()(layer(inputs))))
      optimizer = dmp.DistributedOptimizer(keras.optimizers.Adagrad(0.1), comm)
      model.compile(optimizer=optimizer, loss="mse")
      optimizer.build(model.trainable_variables)
      for v in optimizer.variables:
        if v.dtype == "float32":
          v.assign(tf.fill(v.shape, comm.rank + 10.0))
      sharded_before = [v.numpy() for v in layer.weights]
      callback = dmp.BroadcastGlobalVariablesCallback(1, comm)
      callback.set_model(model)
      callback.on_train_batch_end(0)
      after_first = {
        "kernel": dense.kernel.numpy(),
        "sharded": [v.numpy() for v in layer.weights],
        "slots": {v.name: v.numpy() for v in optimizer.variables if v.dtype == "float32"},
      }
      dense.kernel.assign(tf.fill(dense.kernel.shape, comm.rank + 5.0))
      callback.on_train_batch_end(1)
      return sharded_before, after_first, dense.kernel.numpy(), [v.path for v in layer.weights]

    for rank, (before, after, kernel, sharded) in enumerate(comm_lib.run_in_threads(2, work)):
      self.assertAllEqual(np.full_like(after["kernel"], 2.0), after["kernel"])  # root is rank 1
      for x, y in zip(before, after["sharded"]):
        self.assertAllEqual(x, y)
      prefixes = tuple(path.replace("/", "_") + "_" for path in sharded)
      self.assertTrue(any(name.startswith(prefixes) for name in after["slots"]))
      for name, value in after["slots"].items():
        own = name.startswith(prefixes)
        self.assertAllEqual(np.full_like(value, rank + 10.0 if own else 11.0), value)
      self.assertAllEqual(np.full_like(kernel, rank + 5.0), kernel)  # no second broadcast

  def test_exchange_bytes_against_the_plan(self):
    # 'basic' on 2 workers: tables 0, 2, 4 (widths 8 + 16 + 4 = 28) and 1, 3 (4 + 8 = 12).
    layer = dmp.DistributedEmbedding(
      [de.Embedding(r, w, combiner="sum") for r, w in TABLES],
      communicator=comm_lib.Communicator(0, 2),
    )
    got = layer.exchange_bytes_per_step(local_batch=4)
    # Each worker sends one block of 4 rows x 28 floats to its peer, forward and backward.
    self.assertEqual(2 * 2 * 4 * 28 * 4, got["all_to_all"])
    # Minimum: worker 0 sends 4 rows x 28, worker 1 sends 4 rows x 12, both directions.
    self.assertEqual(2 * (4 * 28 + 4 * 12) * 4, got["minimum"])

  @parameterized.product(
    mode=["row_sliced", "table_wise", "column_sliced", "data_parallel", "mixed"],
    id_format=["dense", "ragged", "sparse"],
    traced=[False, True],
  )
  def test_ids_outside_their_table_fail_on_every_worker(self, mode, id_format, traced):
    # Worker 1 gets id 400 for input 1 (a 30-row table, row-sliced in 'row_sliced'); every
    # worker raises the same InvalidArgumentError, nothing is written, and the next call works.
    combiner = "mean" if id_format == "ragged" else "sum"

    def work(comm):
      layer = dmp.DistributedEmbedding(
        [de.Embedding(r, w, combiner=combiner) for r, w in TABLES], communicator=comm, **MODES[mode]
      )
      layer.build()
      before = layer.get_weights(all_ranks=True)
      ids = _inputs(3, list(range(len(TABLES))), id_format)
      local = slice(comm.rank * 4, comm.rank * 4 + 4)
      good = [_feed(x, local, id_format) for x in ids]
      bad = list(good)
      if comm.rank == 1:
        ids[1] = [list(b) for b in ids[1]] if id_format != "dense" else ids[1].copy()
        if id_format == "dense":
          ids[1][5, 0] = 400
        else:
          ids[1][5] = [2, 400]
        bad[1] = _feed(ids[1], local, id_format)
      call = tf.function(layer.__call__) if traced else layer
      try:
        call(bad)
        error = None
      except tf.errors.InvalidArgumentError as e:
        error = str(e)
      after = layer.get_weights(all_ranks=True)
      outs = [o.numpy() for o in call(good)]
      return error, before, after, outs

    for error, before, after, outs in comm_lib.run_in_threads(2, work):
      self.assertIsNotNone(error)
      self.assertIn("ids of input 1 must be in [0, 30), the rows of table 1", error)
      self.assertIn("= 400 on worker 1", error)
      for b, a in zip(before, after):
        self.assertAllEqual(b, a)
      self.assertLen(outs, len(TABLES))

  @parameterized.parameters(False, True)
  def test_malformed_sparse_ids_fail_on_every_worker_with_our_message(self, traced):
    def work(comm):
      layer = dmp.DistributedEmbedding(
        [de.Embedding(r, w, combiner="sum") for r, w in TABLES],
        communicator=comm,
        row_slice_threshold=300,
      )
      good = [tf.ragged.constant([[1, 2], [3]], dtype=tf.int64).to_sparse()] * len(TABLES)
      bad = list(good)
      if comm.rank == 0:  # indices out of row-major order
        bad[2] = tf.SparseTensor([[1, 0], [0, 0]], tf.constant([1, 2], tf.int64), [2, 2])
      call = tf.function(layer.__call__) if traced else layer
      with self.assertRaisesRegex(
        tf.errors.InvalidArgumentError, "input 2 on worker 0 is malformed.*canonical row-major"
      ):
        call(bad)
      return [o.numpy() for o in call(good)]

    for outs in comm_lib.run_in_threads(2, work):
      self.assertLen(outs, len(TABLES))

  @parameterized.parameters(False, True)
  def test_workers_that_disagree_fail_with_what_differs(self, traced):
    # Worker 1 builds a different table 2, then feeds input 0 ragged where worker 0 feeds it
    # dense. Each time every worker raises an error that says what differs, promptly, and the
    # collectives stay usable.
    def work(comm):
      tables = [list(t) for t in TABLES]
      if comm.rank == 1:
        tables[2][0] += 1
      odd = dmp.DistributedEmbedding(
        [de.Embedding(r, w, combiner="sum") for r, w in tables], communicator=comm
      )
      same = dmp.DistributedEmbedding(
        [de.Embedding(r, w, combiner="sum") for r, w in TABLES], communicator=comm
      )
      ids = [tf.constant([[1, 2], [3, 4]], tf.int64)] * len(TABLES)
      errors = []
      for layer, feed in (
        (odd, ids),
        (same, [tf.ragged.constant([[1, 2], [3, 4]])] + ids[1:] if comm.rank == 1 else ids),
      ):
        call = tf.function(layer.__call__) if traced else layer
        with self.assertRaises(tf.errors.InvalidArgumentError) as raised:
          call(feed)
        errors.append(str(raised.exception))
      return errors, [o.numpy() for o in same(ids)]

    for (plan, formats), outs in comm_lib.run_in_threads(2, work, timeout=60):
      self.assertIn("the workers disagree on the tables and their placement", plan)
      self.assertIn("the workers were fed inputs of different structure", formats)
      self.assertLen(outs, len(TABLES))

  def test_model_parallel_input_without_a_combiner_must_be_one_hot(self):
    def work(comm):
      layer = dmp.DistributedEmbedding(
        [de.Embedding(r, w) for r, w in TABLES], communicator=comm, dp_input=False
      )
      feed = [tf.zeros([4, 2], tf.int64) for _ in layer.local_input_indices]
      with self.assertRaisesRegex(
        ValueError,
        r"dp_input=False, input \d+ of table \d+ \(no "
        r"combiner\) must be one-hot: 1-D ids",
      ):
        layer(feed)

    comm_lib.run_in_threads(2, work)

  @parameterized.parameters(False, True)
  def test_ids_whose_hotness_or_format_changes_between_calls(self, traced):
    # The same layer sees dense ids of hotness 2, then 3, then ragged ids: each collective's
    # shape follows from its size class, so no instance key meets two shapes.
    rng = np.random.default_rng(2)
    weights = [rng.standard_normal(shape).astype(np.float32) for shape in TABLES]
    batches = [[rng.integers(0, r, size=(4, h)) for r, _ in TABLES] for h in (2, 3)]
    batches.append([[list(rng.integers(0, r, size=n)) for n in (0, 3, 1, 2)] for r, _ in TABLES])

    def work(comm):
      layer = dmp.DistributedEmbedding(
        [de.Embedding(r, w, combiner="sum") for r, w in TABLES],
        communicator=comm,
        row_slice_threshold=300,
      )
      layer.build()
      layer.set_weights(weights)
      call = tf.function(layer.__call__, reduce_retracing=True) if traced else layer
      local = slice(comm.rank * 2, comm.rank * 2 + 2)
      outs = []
      for ids in batches:
        fmt = "ragged" if isinstance(ids[0], list) else "dense"
        outs.append([o.numpy() for o in call([_feed(x, local, fmt) for x in ids])])
      return outs

    for rank, outs in enumerate(comm_lib.run_in_threads(2, work, timeout=60)):
      for ids, got in zip(batches, outs):
        for t, (x, o) in enumerate(zip(ids, got)):
          bags = x[rank * 2 : rank * 2 + 2]
          expected = [
            weights[t][list(b)].sum(0) if len(b) else np.zeros(TABLES[t][1]) for b in bags
          ]
          self.assertAllClose(np.array(expected), o, rtol=1e-5)

  @parameterized.parameters(False, True)
  def test_a_mistake_found_on_one_worker_fails_every_worker_at_once(self, traced):
    # With dp_input=False each worker checks only its own inputs: worker 0 passes 2-D ids to a
    # table without a combiner. It raises its ValueError and worker 1 learns of it in the check,
    # instead of waiting in a collective; afterwards both work.
    layers = [de.Embedding(r, w) for r, w in TABLES]

    def work(comm):
      layer = dmp.DistributedEmbedding(layers, communicator=comm, dp_input=False)
      good = [tf.zeros([4], tf.int64) for _ in layer.local_input_indices]
      bad = (
        [tf.zeros([4, 2], tf.int64) for _ in layer.local_input_indices] if comm.rank == 0 else good
      )
      call = tf.function(layer.__call__) if traced else layer
      start = time.monotonic()
      try:
        call(bad)
        error = None
      except (ValueError, tf.errors.InvalidArgumentError) as e:
        error = (type(e).__name__, str(e))
      return error, time.monotonic() - start, [o.shape for o in layer(good)]

    for rank, (error, seconds, shapes) in enumerate(comm_lib.run_in_threads(2, work, timeout=60)):
      self.assertIsNotNone(error)
      self.assertLess(seconds, 30)
      if traced:
        self.assertEqual("InvalidArgumentError", error[0])
      else:
        self.assertEqual("ValueError", error[0])
      text = "must be one-hot" if rank == 0 else "worker 0 could not use its inputs"
      if not (traced and rank == 0):
        self.assertIn(text, error[1])
      self.assertLen(shapes, len(TABLES))

  def test_model_parallel_inputs_of_one_worker_need_one_batch(self):
    def work(comm):
      layer = dmp.DistributedEmbedding(
        [de.Embedding(r, w, combiner="sum") for r, w in TABLES], communicator=comm, dp_input=False
      )
      feed = [
        tf.zeros([4 if k == 0 else 8, 2], tf.int64) for k, _ in enumerate(layer.local_input_indices)
      ]
      if len(feed) < 2:
        feed = [tf.zeros([4, 2], tf.int64)] * len(feed)
      with self.assertRaisesRegex(
        tf.errors.InvalidArgumentError, "every input of a worker must have the same batch"
      ):
        layer(feed)

    comm_lib.run_in_threads(2, work)

  def test_many_layers_on_one_communicator(self):
    # Keys are reserved per layer; layers that are gone leave room for new ones.
    comm = comm_lib.Communicator(0, 2, comm_lib.new_group_key())
    for _ in range(300):
      dmp.DistributedEmbedding([de.Embedding(10, 4)], communicator=comm)

  def test_replicated_tables_get_their_gradients_sparse(self):
    # Two replicated tables: each worker's IndexedSlices gradient is gathered, rows of every
    # worker with values / 2, never a table-sized all-reduce.
    tables = [(1000, 4), (500, 8)]
    rng = np.random.default_rng(5)
    weights = [rng.standard_normal(t).astype(np.float32) for t in tables]
    ids = [rng.integers(0, r, size=(4, 3)) for r, _ in tables]

    def work(comm):
      layer = dmp.DistributedEmbedding(
        [de.Embedding(r, w, combiner="sum") for r, w in tables],
        communicator=comm,
        data_parallel_threshold=10**6,
      )
      layer.build()
      layer.set_weights(weights)
      local = slice(comm.rank * 2, comm.rank * 2 + 2)

      def step(feed):
        with tf.GradientTape() as tape:
          loss = sum(tf.reduce_sum(o * (t + 1.0)) for t, o in enumerate(layer(feed)))
        return dmp.DistributedGradientTape(tape, comm).gradient(loss, layer.trainable_variables)

      feed = [tf.constant(x[local]) for x in ids]
      graph = tf.function(step).get_concrete_function(feed).graph
      reduced = [
        op.outputs[0].shape.as_list()
        for op in graph.get_operations()
        if op.type == "CollectiveReduceV2"
      ]
      grads = step(feed)
      return reduced, [(type(g).__name__, g.indices.numpy(), g.values.numpy()) for g in grads]

    for reduced, grads in comm_lib.run_in_threads(2, work):
      for rows, width in tables:
        self.assertNotIn([rows, width], reduced)
      for t, (kind, indices, values) in enumerate(grads):
        self.assertEqual("IndexedSlices", kind)
        dense = np.zeros(tables[t])
        np.add.at(dense, indices, values)
        expected = np.zeros(tables[t])
        np.add.at(expected, ids[t].reshape(-1), (t + 1.0) / 2)
        self.assertAllClose(expected, dense, rtol=1e-6)

  def test_get_weights_on_rank_zero_unless_all_ranks(self):
    def work(comm):
      layer = dmp.DistributedEmbedding(
        [de.Embedding(r, w) for r, w in TABLES], communicator=comm, **MODES["mixed"]
      )
      layer.build()
      optimizer = keras.optimizers.Adagrad(0.1)
      return (
        len(layer.get_weights()),
        len(layer.get_weights(all_ranks=True)),
        len(layer.get_optimizer_slots(optimizer)),
        len(layer.get_optimizer_slots(optimizer, all_ranks=True)),
      )

    self.assertEqual([(5, 5, 1, 1), (0, 5, 0, 1)], comm_lib.run_in_threads(2, work))

  def test_package_exports(self):
    self.assertIs(de.dist_model_parallel.DistributedEmbedding, dmp.DistributedEmbedding)
    for name in (
      "DistEmbeddingStrategy",
      "DistributedEmbedding",
      "broadcast_variables",
      "DistributedGradientTape",
      "DistributedOptimizer",
      "BroadcastGlobalVariablesCallback",
    ):
      self.assertTrue(hasattr(de, name), name)
    strategy = de.DistEmbeddingStrategy(
      [de.Embedding(r, w) for r, w in TABLES], 4, "memory_optimized"
    )
    self.assertEqual(4, len(strategy.plan.shards))
    self.assertIn("worker 3", str(strategy))
    self.assertIs(de.DistributedGradientTape, dmp.DistributedGradientTape)

  def test_plan_and_bad_arguments(self):
    layers = [de.Embedding(r, w) for r, w in TABLES]
    layer = dmp.DistributedEmbedding(layers)
    self.assertIn("worker 0", str(layer.plan))
    with self.assertRaisesRegex(ValueError, "'strategy' must be one of"):
      dmp.DistributedEmbedding(layers, strategy="fastest")
    with self.assertRaisesRegex(TypeError, "DistributedEmbedding: 'communicator' must be a"):
      dmp.DistributedEmbedding(layers, communicator="grpc")
    with self.assertRaisesRegex(ValueError, "expected 5 inputs; got 1"):
      layer([tf.constant([[1]])])
    # Settings the shards would not honour are errors, not silently dropped.
    for kwargs, text in (
      (dict(embeddings_regularizer="l2"), "embeddings_regularizer="),
      (dict(embeddings_constraint="non_neg"), "embeddings_constraint="),
      (dict(mask_zero=True), "mask_zero=True"),
      (dict(trainable=False), "trainable=False"),
    ):
      with self.assertRaisesRegex(ValueError, r"embeddings\[1\] \(Embedding\) has " + text):
        dmp.DistributedEmbedding([layers[0], keras.layers.Embedding(30, 4, **kwargs)])


if __name__ == "__main__":
  absltest.main()
