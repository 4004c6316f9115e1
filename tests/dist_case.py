"""The model-parallel test case shared by the in-process tests and the multi-process worker."""

import keras
import numpy as np
import tensorflow as tf

import distributed_embeddings as de
from distributed_embeddings.python.layers import dist_model_parallel as dmp
from distributed_embeddings.python.training import sparse_updates

TABLES = [(50, 8), (30, 4), (64, 16), (10, 8), (100, 4)]  # (rows, width)
GLOBAL_BATCH = 8
HOTNESS = [3, 1, 2, 4, 5]

MODES = {
  "table_wise": dict(),
  "memory_optimized": dict(strategy="memory_optimized"),
  "column_sliced": dict(column_slice_threshold=100),
  "row_sliced": dict(row_slice_threshold=300),
  "data_parallel": dict(data_parallel_threshold=200),
  "mixed": dict(
    column_slice_threshold=200,
    row_slice_threshold=500,
    data_parallel_threshold=100,
    strategy="memory_balanced",
  ),
  "shared_tables": dict(input_table_map=[0, 1, 2, 3, 4, 0, 2]),
  "balanced": dict(
    strategy="balanced", column_slice_threshold=150, input_table_map=[0, 1, 2, 3, 4, 0, 2]
  ),
  "model_parallel_input": dict(dp_input=False, column_slice_threshold=150),
}


def inputs(seed, input_table_map, id_format="dense"):
  """Global-batch ids per input: dense [batch, hotness], or (for 'ragged' and 'sparse') lists of
  bags of 0 to 2 * hotness ids, empty bags included."""
  rng = np.random.default_rng(seed)
  if id_format == "dense":
    return [
      rng.integers(0, TABLES[t][0], size=(GLOBAL_BATCH, HOTNESS[i % len(HOTNESS)]))
      for i, t in enumerate(input_table_map)
    ]
  return [
    [
      list(rng.integers(0, TABLES[t][0], size=rng.integers(0, 2 * HOTNESS[i % 5] + 1)))
      for _ in range(GLOBAL_BATCH)
    ]
    for i, t in enumerate(input_table_map)
  ]


def feed_ids(ids, rows, id_format):
  """Rows `rows` (a slice) of one input's ids, as the tensor type of `id_format`."""
  if id_format == "dense":
    return tf.constant(ids[rows])
  ragged = tf.ragged.constant(ids[rows], dtype=tf.int64, ragged_rank=1)
  return ragged if id_format == "ragged" else ragged.to_sparse()


def initial_state(input_table_map):
  """(initial tables, per-input loss coefficients [GLOBAL_BATCH, width]) of the training case."""
  rng = np.random.default_rng(42)
  weights = [rng.standard_normal(shape).astype(np.float32) for shape in TABLES]
  coefs = [
    rng.standard_normal((GLOBAL_BATCH, w)).astype(np.float32)
    for w in (TABLES[t][1] for t in input_table_map)
  ]
  return weights, coefs


def sgd_apply(variables, grads, lr):
  """Plain SGD: sparse gradients scattered into their rows, dense ones subtracted."""
  for v, g in zip(variables, grads):
    if isinstance(g, tf.IndexedSlices):
      sparse_updates.backing_variable(v).scatter_sub(
        tf.IndexedSlices(lr * g.values, g.indices, g.dense_shape)
      )
    else:
      v.assign_sub(lr * g)


def train_worker(comm, mode, combiner, steps=3, lr=0.5, id_format="dense", compiled=False):
  """This worker's (first-step outputs, tables after `steps` SGD steps) of `mode` (a MODES
  value): every worker trains its share of the same global batches."""
  input_table_map = mode.get("input_table_map", list(range(len(TABLES))))
  weights, coefs = initial_state(input_table_map)
  batches = [inputs(100 + s, input_table_map, id_format) for s in range(steps)]

  layers = [de.Embedding(r, w, combiner=combiner) for r, w in TABLES]
  layer = dmp.DistributedEmbedding(layers, communicator=comm, **mode)
  layer.build()
  layer.set_weights(weights)
  n, rank = comm.world_size, comm.rank
  local = slice(rank * GLOBAL_BATCH // n, (rank + 1) * GLOBAL_BATCH // n)
  first = None

  def step(feed):
    with tf.GradientTape() as tape:
      outs = layer(feed)
      # Each worker's loss is a mean over its local batch, as in data-parallel training.
      loss = sum(
        tf.reduce_sum(tf.reshape(o, [tf.shape(o)[0], -1])[:, : c.shape[1]] * c[local])
        for o, c in zip(outs, coefs)
      ) / (GLOBAL_BATCH // n)
    variables = layer.trainable_variables
    sgd_apply(variables, dmp.DistributedGradientTape(tape, comm).gradient(loss, variables), lr)
    return outs

  if compiled:
    step = tf.function(step)
  for ids in batches:
    if layer.dp_input:
      feed = [feed_ids(x, local, id_format) for x in ids]
    else:
      feed = [feed_ids(ids[i], slice(None), id_format) for i in layer.local_input_indices]
    outs = step(feed)
    if first is None:
      first = [o.numpy() for o in outs]
  return first, layer.get_weights(all_ranks=True)


MODE = dict(column_slice_threshold=200, row_slice_threshold=500, data_parallel_threshold=100)


def initial_tables():
  rng = np.random.default_rng(42)
  return [rng.standard_normal(shape).astype(np.float32) for shape in TABLES]


def batch(step):
  rng = np.random.default_rng(100 + step)
  ids = [rng.integers(0, TABLES[t][0], size=(GLOBAL_BATCH, HOTNESS[t])) for t in range(len(TABLES))]
  target = rng.standard_normal((GLOBAL_BATCH, 1)).astype(np.float32)
  return ids, target


def build_model(communicator, combiner="mean"):
  """Inputs -> DistributedEmbedding -> concat -> Dense(1), tables and dense weights fixed."""
  inputs = [keras.Input(shape=(h,), dtype="int64") for h in HOTNESS]
  layer = dmp.DistributedEmbedding(
    [de.Embedding(r, w, combiner=combiner) for r, w in TABLES], communicator=communicator, **MODE
  )
  pooled = keras.layers.Concatenate()(layer(inputs))
  dense = keras.layers.Dense(1, kernel_initializer=keras.initializers.Constant(0.05))
  model = keras.Model(inputs, dense(pooled))
  layer.set_weights(initial_tables())
  return model, layer


def fit(communicator, epochs=2, lr=0.05, optimizer="sgd", callbacks=()):
  """Keras model.fit on this worker's share of the global batches; returns (tables, kernel)."""
  n, rank = communicator.world_size, communicator.rank
  local = slice(rank * GLOBAL_BATCH // n, (rank + 1) * GLOBAL_BATCH // n)
  model, layer = build_model(communicator)
  optimizer = dmp.DistributedOptimizer(
    keras.optimizers.SGD(lr) if optimizer == "sgd" else keras.optimizers.Adagrad(lr), communicator
  )
  model.compile(optimizer=optimizer, loss="mse")
  xs, ys = zip(*[batch(s) for s in range(3)])
  x = [np.concatenate([ids[t][local] for ids in xs]) for t in range(len(TABLES))]
  y = np.concatenate([target[local] for target in ys])
  model.fit(
    x,
    y,
    batch_size=GLOBAL_BATCH // n,
    epochs=epochs,
    shuffle=False,
    verbose=2,
    callbacks=list(callbacks) + [dmp.BroadcastGlobalVariablesCallback(0, communicator)],
  )
  return layer.get_weights(all_ranks=True), model.layers[-1].kernel.numpy()
