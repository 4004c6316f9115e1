"""The model-parallel test case shared by the in-process tests and the multi-process worker."""

import keras
import numpy as np
import tensorflow as tf

import distributed_embeddings as de
from distributed_embeddings.python.layers import dist_model_parallel as dmp

TABLES = [(50, 8), (30, 4), (64, 16), (10, 8), (100, 4)]  # (rows, width)
GLOBAL_BATCH = 8
HOTNESS = [3, 1, 2, 4, 5]
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
  layer = dmp.DistributedEmbedding([de.Embedding(r, w, combiner=combiner) for r, w in TABLES],
                                   communicator=communicator, **MODE)
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
      keras.optimizers.SGD(lr) if optimizer == "sgd" else keras.optimizers.Adagrad(lr),
      communicator)
  model.compile(optimizer=optimizer, loss="mse")
  xs, ys = zip(*[batch(s) for s in range(3)])
  x = [np.concatenate([ids[t][local] for ids in xs]) for t in range(len(TABLES))]
  y = np.concatenate([target[local] for target in ys])
  model.fit(x, y, batch_size=GLOBAL_BATCH // n, epochs=epochs, shuffle=False, verbose=2,
            callbacks=list(callbacks) + [dmp.BroadcastGlobalVariablesCallback(0, communicator)])
  return layer.get_weights(), model.layers[-1].kernel.numpy()
