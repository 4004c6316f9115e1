"""Models built the ways users build them, trained on N workers and on one, for the tests.

Every case trains a model whose embeddings go through DistributedEmbedding on N workers (threads
or processes) and the same model without DistributedEmbedding, built from stock layers, on one
worker over the global batch. Both start from the same tables and dense weights (NumPy), and
each worker's loss is its share of the global loss, so after every optimizer step the N-worker
tables and weights must equal the single-process ones. Nothing here calls `build()` on a model:
Keras builds each one in its first call, symbolically, as it does for users.
"""

import dataclasses
from typing import Optional, Sequence

import keras
import numpy as np
import tensorflow as tf

import distributed_embeddings as de
from distributed_embeddings import dist_model_parallel as dmp

# (rows, width): widths of 2 to 25, including several of one width (fused on a worker).
TABLES = ((40, 8), (11, 7), (5, 8), (64, 16), (3, 12), (25, 4), (12, 8))
OUT_UNITS = 5


class GatherEmbedding(keras.layers.Layer):
  """A user's own embedding layer: only input_dim and output_dim in its config."""

  def __init__(self, input_dim, output_dim, **kwargs):
    super().__init__(**kwargs)
    self.input_dim = input_dim
    self.output_dim = output_dim

  def build(self, input_shape):
    self.params = self.add_weight(shape=(self.input_dim, self.output_dim), name="params")

  def call(self, inputs):
    return tf.gather(self.params, inputs)

  def get_config(self):
    return {"input_dim": self.input_dim, "output_dim": self.output_dim}


def embedding_layers(tables, kind, combiner=None):
  """Fresh layers for `tables`: stock Keras ('keras'), ours with a combiner ('ours'), or a
  custom layer ('custom')."""
  if kind == "keras":
    return [keras.layers.Embedding(r, w) for r, w in tables]
  if kind == "custom":
    return [GatherEmbedding(r, w) for r, w in tables]
  return [de.Embedding(r, w, combiner=combiner) for r, w in tables]


def _flat(x):
  return tf.reshape(x, [tf.shape(x)[0], -1]) if x.shape.rank != 2 else x


class ListModel(keras.Model):
  """A list of embeddings (through DistributedEmbedding when `distribute` holds its
  arguments), concatenated, then Dense(5). Subclassed, with no build()."""

  def __init__(self, layers, distribute=None, input_table_map=None, communicator=None):
    super().__init__()
    self.embeddings = layers
    self.input_table_map = input_table_map or list(range(len(layers)))
    self.dist = None
    if distribute is not None:
      self.dist = dmp.DistributedEmbedding(
        layers, input_table_map=input_table_map, communicator=communicator, **distribute
      )
    self.dense = keras.layers.Dense(OUT_UNITS)

  def call(self, inputs):
    if self.dist is not None:
      outs = self.dist(inputs)
    else:
      outs = [self.embeddings[t](x) for t, x in zip(self.input_table_map, inputs)]
    return self.dense(tf.concat([_flat(o) for o in outs], axis=1))


@dataclasses.dataclass
class Case:
  """One training run.

  batches: per step, the local batch of every worker (their sum is that step's global batch).
  id_format: 'one_hot' (1-D ids), 'dense' (hotness from `hotness`), 'ragged' or 'sparse'.
  model: 'subclassed', 'functional' or 'sequential'.
  """

  distribute: dict
  batches: Sequence[Sequence[int]]
  tables: Sequence = TABLES
  kind: str = "keras"
  combiner: Optional[str] = None
  id_format: str = "one_hot"
  hotness: Sequence[int] = (3, 1, 2, 4, 1, 2, 5)
  input_table_map: Optional[Sequence[int]] = None
  model: str = "subclassed"
  graph: bool = False
  lr: float = 0.3
  policy: Optional[str] = None
  seed: int = 0

  @property
  def world_size(self):
    return len(self.batches[0])

  @property
  def table_map(self):
    return list(self.input_table_map or range(len(self.tables)))


def global_ids(case, step):
  """Per input, the global batch of `step`: an int64 array (one-hot, dense) or lists of bags
  (ragged, sparse; empty bags included)."""
  rng = np.random.default_rng(1000 * case.seed + step)
  batch = sum(case.batches[step])
  out = []
  for i, t in enumerate(case.table_map):
    rows = case.tables[t][0]
    if case.id_format == "one_hot":
      out.append(rng.integers(0, rows, size=batch))
    elif case.id_format == "dense":
      out.append(rng.integers(0, rows, size=(batch, case.hotness[i % len(case.hotness)])))
    else:
      hot = case.hotness[i % len(case.hotness)]
      out.append(
        [list(rng.integers(0, rows, size=rng.integers(0, 2 * hot + 1))) for _ in range(batch)]
      )
  return out


def to_tensor(ids, rows, id_format):
  """Rows `rows` (a slice) of one input's global ids, as the tensor type of `id_format`."""
  if id_format in ("one_hot", "dense"):
    return tf.constant(ids[rows], tf.int64)
  ragged = tf.ragged.constant(ids[rows], dtype=tf.int64, ragged_rank=1)
  return ragged if id_format == "ragged" else ragged.to_sparse()


def targets(case, step):
  rng = np.random.default_rng(7 + 1000 * case.seed + step)
  return rng.standard_normal((sum(case.batches[step]), OUT_UNITS)).astype(np.float32)


def initial_weights(case):
  """(tables, dense kernel, dense bias) every run starts from."""
  rng = np.random.default_rng(42 + case.seed)
  tables = [rng.standard_normal(shape).astype(np.float32) for shape in case.tables]
  width = 0
  for i, t in enumerate(case.table_map):
    per_row = (
      case.hotness[i % len(case.hotness)]
      if (case.id_format == "dense" and case.combiner is None)
      else 1
    )
    width += per_row * case.tables[t][1]
  kernel = (rng.standard_normal((width, OUT_UNITS)) * 0.3).astype(np.float32)
  return tables, kernel, np.zeros(OUT_UNITS, np.float32)


def _keras_input(case, i):
  if case.id_format == "one_hot":
    return keras.Input(shape=(), dtype="int64")
  if case.id_format == "dense":
    return keras.Input(shape=(case.hotness[i % len(case.hotness)],), dtype="int64")
  return keras.Input(
    shape=(None,),
    dtype="int64",
    ragged=case.id_format == "ragged",
    sparse=case.id_format == "sparse",
  )


def build_model(case, communicator=None, distributed=True):
  """(model, its DistributedEmbedding or None, its Dense layer). Distributed: built in
  `case.model`'s way, DistributedEmbedding on `communicator`. Otherwise the reference: a
  ListModel of plain layers (the same computation, without any of our model-parallel code)."""
  layers = embedding_layers(case.tables, case.kind, case.combiner)
  if not distributed or case.model == "subclassed":
    model = ListModel(
      layers, case.distribute if distributed else None, case.input_table_map, communicator
    )
    return model, model.dist, model.dense
  dense = keras.layers.Dense(OUT_UNITS)
  dist = dmp.DistributedEmbedding(
    layers, input_table_map=case.input_table_map, communicator=communicator, **case.distribute
  )
  if case.model == "functional":
    indices = range(len(case.table_map)) if dist.dp_input else dist.local_input_indices
    inputs = [_keras_input(case, i) for i in indices]
    flat = [keras.layers.Flatten()(o) if len(o.shape) > 2 else o for o in dist(inputs)]
    return keras.Model(inputs, dense(keras.layers.Concatenate()(flat))), dist, dense
  # Sequential: the first layer takes the list of id tensors.
  concat = keras.layers.Lambda(lambda outs: tf.concat([_flat(o) for o in outs], axis=1))
  return keras.Sequential([dist, concat, dense]), dist, dense


def feed_for(case, dist, ids, rank, step):
  """What worker `rank` is fed at `step`: its local rows of every input (dp_input=True), or the
  global batch of its own inputs (dp_input=False)."""
  rows = local_rows(case, rank, step)
  if dist is not None and not dist.dp_input:
    return [to_tensor(ids[i], slice(None), case.id_format) for i in dist.local_input_indices]
  return [to_tensor(x, rows, case.id_format) for x in ids]


def local_rows(case, rank, step):
  start = sum(case.batches[step][:rank])
  return slice(start, start + case.batches[step][rank])


def train(case, communicator, distributed=True):
  """Trains `case` on this worker (or, distributed=False, the plain model on one worker over the
  global batch) with a custom loop: DistributedGradientTape and Keras SGD.

  Returns (outputs of every step for this worker's rows, tables after training on rank 0 (or
  every rank), [kernel, bias], which variables are model parallel)."""
  if case.policy:
    keras.mixed_precision.set_global_policy(case.policy)
  try:
    return _train(case, communicator, distributed)
  finally:
    if case.policy:
      keras.mixed_precision.set_global_policy("float32")


def _train(case, communicator, distributed):
  rank, n = communicator.rank, communicator.world_size
  model, dist, dense = build_model(case, communicator, distributed)
  tables, kernel, bias = initial_weights(case)
  optimizer = keras.optimizers.SGD(case.lr)
  global_rows = [sum(b) for b in case.batches]

  def loss_of(out, y, scale):
    return tf.reduce_sum(tf.square(tf.cast(out, tf.float32) - y)) * scale

  def step(feed, y, scale):
    with tf.GradientTape() as tape:
      out = model(feed)
      loss = loss_of(out, y, scale)
    grads = dmp.DistributedGradientTape(tape, communicator).gradient(
      loss, model.trainable_variables
    )
    optimizer.apply(grads, model.trainable_variables)
    return out

  if case.graph:
    step = tf.function(step, reduce_retracing=True)
  outputs = []
  for s in range(len(case.batches)):
    ids = global_ids(case, s)
    y = targets(case, s)
    if distributed:
      feed = feed_for(case, dist, ids, rank, s)
      rows = local_rows(case, rank, s)
    else:
      feed = [to_tensor(x, slice(None), case.id_format) for x in ids]
      rows = slice(None)
    if s == 0:
      model(feed)  # Keras builds the model here; then both runs start from the same numbers.
      if dist is not None:
        dist.set_weights(tables)
      else:
        for t, layer in enumerate(model.embeddings):
          layer.set_weights([tables[t]])
      dense.set_weights([kernel, bias])
    # Each worker's share of the global loss: the mean over the global batch, times the number
    # of workers whose gradients DistributedGradientTape averages.
    scale = tf.constant((n if distributed else 1) / global_rows[s], tf.float32)
    out = step(feed, tf.constant(y[rows]), scale)
    outputs.append(out.numpy())
  flags = [dmp.is_model_parallel(v) for v in dist.trainable_variables] if dist else []
  if dist is not None:
    final = dist.get_weights(all_ranks=True)
  else:
    final = [layer.get_weights()[0] for layer in model.embeddings]
  return outputs, final, [w.numpy() for w in dense.weights], flags
