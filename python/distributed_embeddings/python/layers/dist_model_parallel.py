"""Model-parallel embeddings: tables sharded across workers, activations moved with all-to-all.

`DistributedEmbedding` wraps a list of embedding layers. The planner (planner.py) places each
table whole, in column slices, in row slices or replicated; every worker then holds only its own
shards. Forward, with data-parallel input (`dp_input=True`, each worker has its local batch of
every feature): ids of sharded tables are all-gathered, each worker looks up its shards for the
global batch, and one all-to-all returns to every worker the rows of its local batch. Row slices
produce partial sums that are all-reduced. Backward runs the same exchanges in reverse, so each
shard receives its sparse gradient locally. Replicated (data-parallel) tables are looked up
locally and their gradients are averaged by `DistributedGradientTape`.

On each worker, whole tables and column slices of one width are stored in one variable and
their pooled lookups run as one kernel call (fusion), which matters when a model has dozens of
small tables.

Workers communicate through a `Communicator` (TensorFlow collective ops); with one worker the
layer is a plain set of lookups. Ids may be dense [batch, hotness], ragged or sparse; ragged and
sparse ids of sharded tables need a combiner, and their values travel by a variable-size
all-gather. `dp_input=False` supports whole and column-sliced tables only.
"""

import os
import weakref

import keras
import numpy as np
import tensorflow as tf

from distributed_embeddings.python.layers import planner as planner_lib
from distributed_embeddings.python.ops import embedding_lookup_ops
from distributed_embeddings.python.parallel import communicator as comm_lib

# Joining the other workers, importable from here as from the package's dist_model_parallel.
init_from_env = comm_lib.init_from_env

# Variables whose gradients are already complete on their owner (sharded tables):
# DistributedGradientTape scales rather than all-reduces them. Keyed by id() with a weak
# reference to check identity, since the id of a dead variable can be reused.
_MODEL_PARALLEL_VARIABLES = {}


def _rows(ids):
  """Batch size of dense, ragged or sparse ids."""
  if isinstance(ids, tf.RaggedTensor):
    return ids.nrows(out_type=tf.int32)
  if isinstance(ids, tf.SparseTensor):
    return tf.cast(ids.dense_shape[0], tf.int32)
  return tf.shape(ids)[0]


def _is_bag_batch(ids):
  """2-D dense or ragged ids: one bag per row, so batches concatenate along axis 0."""
  if isinstance(ids, tf.RaggedTensor):
    return ids.ragged_rank == 1 and ids.shape.rank == 2
  return isinstance(ids, tf.Tensor) and ids.shape.rank == 2


def _concat_bags(batches):
  """One batch of bags from several: dense batches of one hotness stay dense, else ragged."""
  dtype = tf.int64 if any(b.dtype == tf.int64 for b in batches) else batches[0].dtype
  batches = [tf.cast(b, dtype) if b.dtype != dtype else b for b in batches]
  if all(isinstance(b, tf.Tensor) for b in batches) and len(
      {b.shape[1] for b in batches}) == 1 and batches[0].shape[1] is not None:
    return tf.concat(batches, axis=0)
  ragged = [b.with_row_splits_dtype(tf.int64) if isinstance(b, tf.RaggedTensor) else
            tf.RaggedTensor.from_tensor(b, row_splits_dtype=tf.int64) for b in batches]
  return tf.concat(ragged, axis=0)


def _add_to_ids(ids, delta):
  """`ids` (dense, ragged or sparse) with `delta` added to every id."""
  if isinstance(ids, tf.RaggedTensor):
    return ids.with_values(ids.values + tf.cast(delta, ids.dtype))
  if isinstance(ids, tf.SparseTensor):
    return tf.SparseTensor(ids.indices, ids.values + tf.cast(delta, ids.dtype), ids.dense_shape)
  return ids + tf.cast(delta, ids.dtype)


# Elements written to a variable at a time by set_weights (the reference API's default).
_SET_WEIGHTS_CHUNK = 134217728

# The most elements tables are stacked to in one shared variable (32 MiB of float32); a larger
# table keeps a variable of its own. Keras 3 optimizers apply even a sparse gradient with some
# whole-variable ops (Adagrad: sqrt(accumulator + epsilon)), so each step allocates temporaries the
# size of the variable, and above glibc's 32 MiB mmap ceiling every one of them is fresh memory:
# stacking 8 tables of 200k x 32 into one variable made an Adagrad step 3.5x slower (4.9M page
# faults against 0.8M, BENCHMARKS.md). Lookups gain little from larger stacks.
_MAX_FUSED_ELEMENTS = 8 * 2**20


def _tf_variable(variable):
  inner = getattr(variable, "_value", None)
  return inner if isinstance(inner, tf.Variable) else variable


def _mark_model_parallel(variable):
  variable = _tf_variable(variable)
  _MODEL_PARALLEL_VARIABLES[id(variable)] = weakref.ref(variable)


def _slot_prefix(variable):
  """Keras names an optimizer slot '<its variable's path with _ for />_<slot name>'."""
  return variable.path.replace("/", "_") + "_"


def is_model_parallel(variable):
  """True for the shard variables of a DistributedEmbedding with more than one worker."""
  variable = _tf_variable(variable)
  ref = _MODEL_PARALLEL_VARIABLES.get(id(variable))
  return ref is not None and ref() is variable


# Settings of a wrapped layer that its shards would not honour, with the values that are safe:
# silently training a frozen or regularized table as a plain one would be worse than an error.
_UNSUPPORTED_SETTINGS = {"embeddings_regularizer": None, "activity_regularizer": None,
                         "embeddings_constraint": None, "mask_zero": False, "trainable": True}


def _table_configs(embeddings):
  """The layers' configs and the planner's view of their tables."""
  configs = []
  for i, layer in enumerate(embeddings):
    config = layer.get_config()
    if "input_dim" not in config or "output_dim" not in config:
      raise ValueError(f"embeddings[{i}] ({type(layer).__name__}) must have input_dim and "
                       "output_dim in its config.")
    for key, supported in _UNSUPPORTED_SETTINGS.items():
      if config.get(key, supported) != supported:
        raise ValueError(f"embeddings[{i}] ({type(layer).__name__}) has {key}={config[key]!r}, "
                         f"which DistributedEmbedding does not apply; it must be {supported!r}.")
    configs.append(config)
  return configs, [planner_lib.TableSpec(int(c["input_dim"]), int(c["output_dim"]))
                   for c in configs]


class DistEmbeddingStrategy:
  """The placement of `embeddings` (embedding layers) on `world_size` workers, without building
  anything: `.plan` (planner.Plan, printable) is what DistributedEmbedding would execute.

  Per worker rank r, as the reference API names them: `table_ids[r]` lists the tables with a
  shard on r (each once), and `input_ids_list[r]` the inputs r is fed with dp_input=False, in
  the order DistributedEmbedding takes them.
  """

  def __init__(self, embeddings, world_size, strategy="basic", input_table_map=None,
               column_slice_threshold=None, row_slice_threshold=None,
               data_parallel_threshold=None, gpu_embedding_size=None):
    _, specs = _table_configs(embeddings)
    self.strategy = strategy
    self.world_size = world_size
    self.column_slice_threshold = column_slice_threshold
    self.row_slice_threshold = row_slice_threshold
    self.data_parallel_threshold = data_parallel_threshold
    self.gpu_embedding_size = gpu_embedding_size  # Accepted for the reference API; unused.
    self.plan = planner_lib.make_plan(specs, world_size, strategy, column_slice_threshold,
                                      row_slice_threshold, data_parallel_threshold,
                                      input_table_map)
    self.input_table_map = list(self.plan.input_table_map)
    self.inputs_of_table = {}  # table -> the inputs looked up in it
    for i, t in enumerate(self.input_table_map):
      self.inputs_of_table.setdefault(t, []).append(i)
    self.table_ids = [list(dict.fromkeys(s.table for s in shards)) for shards in self.plan.shards]
    self.input_ids_list = [sorted({i for t in tables for i in self.inputs_of_table[t]})
                           for tables in self.table_ids]

  def __str__(self):
    return str(self.plan)


class DistributedEmbedding(keras.layers.Layer):
  """Shards `embeddings` across the workers of `communicator` (one worker if None).

  Args:
    embeddings: list of embedding layers (ours, keras.layers.Embedding, or any layer whose
      get_config has input_dim and output_dim; a 'combiner' entry pools the last input axis).
    strategy: 'basic', 'memory_balanced', 'memory_optimized' or 'balanced' (memory and
      all-to-all width together; see planner.py).
    column_slice_threshold: largest column slice, in elements; None slices only when there are
      more workers than tables.
    row_slice_threshold: tables larger than this (elements) are split by rows across all workers.
    dp_input: True if every worker passes its local batch of every input; False if it passes the
      global batch of its own inputs only (`local_input_indices`).
    input_table_map: table index of each input (several inputs may share a table); default one
      input per table.
    data_parallel_threshold: tables smaller than this (elements) are replicated on every worker.
    gpu_embedding_size: accepted for compatibility with the reference API; unused on CPU.
    communicator: the worker's Communicator.
  """

  def __init__(self, embeddings, strategy="basic", column_slice_threshold=None,
               row_slice_threshold=None, dp_input=True, input_table_map=None,
               data_parallel_threshold=None, gpu_embedding_size=None, communicator=None,
               **kwargs):
    super().__init__(autocast=False, **kwargs)
    self.supports_jit = False  # Custom ops and collectives: no XLA.
    self.communicator = _communicator(communicator, "DistributedEmbedding")
    self.world_size = self.communicator.world_size
    self.rank = self.communicator.rank
    self.dp_input = dp_input
    self.gpu_embedding_size = gpu_embedding_size
    configs, specs = _table_configs(embeddings)
    self.table_configs = configs
    self.combiners = [c.get("combiner") for c in configs]
    self.strategy = DistEmbeddingStrategy(embeddings, self.world_size, strategy, input_table_map,
                                          column_slice_threshold, row_slice_threshold,
                                          data_parallel_threshold, gpu_embedding_size)
    self.plan = self.strategy.plan
    if not dp_input and self.world_size > 1 and (
        self.plan.data_parallel_tables or
        any(s.kind == "row_slice" for w in self.plan.shards for s in w)):
      raise ValueError("dp_input=False supports whole and column-sliced tables only; drop "
                       "row_slice_threshold and data_parallel_threshold.")
    self.local_shards = self.plan.shards[self.rank]
    self._inputs_of_table = self.strategy.inputs_of_table
    # Inputs this worker must be fed with dp_input=False: those of its shards' tables.
    self.local_input_indices = self.strategy.input_ids_list[self.rank]
    self._input_hotness = {}
    self._shard_vars = []
    self._slots = []
    self._fused_count = {}
    self._replicated_vars = {}

  def build(self, input_shape=None):
    if self.built:
      return
    # Whole tables and column slices of one width share a variable (rows stacked), so a worker
    # looks all of them up in one kernel call; row slices keep their own variables. A shared
    # variable stops growing at _MAX_FUSED_ELEMENTS (see there).
    self._slots = [None] * len(self.local_shards)  # per local shard: (variable, first row)
    groups = {}
    for k, s in enumerate(self.local_shards):
      if s.kind == "row_slice":
        var = self.add_weight(shape=(s.rows, s.width), initializer=self._initializer(s.table),
                              name=f"table{s.table}_r{s.row_begin}_c{s.col_begin}")
        self._slots[k] = (var, 0)
        self._fused_count[id(var)] = 1
        continue
      by_width = groups.setdefault(s.width, [[]])
      if by_width[-1] and (sum(self.local_shards[m].rows for m in by_width[-1]) + s.rows) * \
          s.width > _MAX_FUSED_ELEMENTS:
        by_width.append([])
      by_width[-1].append(k)
    groups = [(width, members) for width, split in sorted(groups.items()) for members in split]
    for width, members in groups:
      parts = [(self.local_shards[k].rows, self._initializer(self.local_shards[k].table))
               for k in members]
      tables = "_".join(str(self.local_shards[k].table) for k in members)

      def stacked(shape, dtype=None, parts=parts, width=width):
        del shape
        return tf.concat([init((rows, width), dtype=dtype) for rows, init in parts], axis=0)

      var = self.add_weight(shape=(sum(rows for rows, _ in parts), width), initializer=stacked,
                            name=f"tables{tables}_w{width}")
      self._fused_count[id(var)] = len(members)
      offset = 0
      for k, (rows, _) in zip(members, parts):
        self._slots[k] = (var, offset)
        offset += rows
    for var, _ in self._slots:
      if not any(var is v for v in self._shard_vars):
        self._shard_vars.append(var)
    for var in self._shard_vars:
      # The reference API marks shard variables with `de_local`; code that checks it still works.
      var.de_local = _tf_variable(var).de_local = True
      if self.world_size > 1:
        _mark_model_parallel(var)
    for t in self.plan.data_parallel_tables:
      spec = self.plan.tables[t]
      self._replicated_vars[t] = self.add_weight(shape=(spec.input_dim, spec.output_dim),
                                                 initializer=self._initializer(t),
                                                 name=f"table{t}_replicated")
    self.built = True

  def _initializer(self, table):
    return keras.initializers.get(self.table_configs[table].get("embeddings_initializer",
                                                                "uniform"))

  # ---- forward ----------------------------------------------------------------------------

  def _lookup(self, variable, ids, combiner, bounds_check="error"):
    return embedding_lookup_ops.embedding_lookup(variable, ids, combiner=combiner,
                                                 bounds_check=bounds_check)

  @staticmethod
  def _flatten(out):
    """[batch, ...] -> [batch, features], so pieces concatenate along axis 1."""
    return tf.reshape(out, [tf.shape(out)[0], -1])

  def call(self, inputs):
    inputs = list(inputs)
    indices = range(len(inputs)) if self.dp_input else self.local_input_indices
    # Dense ids run as [bags, hotness]: 1-D ids are bags of one id, and (with one worker) ids of
    # higher rank fold their leading axes into the batch. Outputs get their shape back below.
    one_hot, leading = set(), {}
    for k, (i, x) in enumerate(zip(indices, inputs)):
      if isinstance(x, (tf.RaggedTensor, tf.SparseTensor)):
        continue
      x = tf.convert_to_tensor(x)
      if x.shape.rank == 1:
        inputs[k] = x[:, tf.newaxis]
        one_hot.add(i)
      elif x.shape.rank is not None and x.shape.rank > 2 and self.world_size == 1:
        inputs[k] = tf.reshape(x, [-1, tf.shape(x)[-1]])
        leading[i] = tf.shape(x)[:-1]
    outputs = self._call_bags(inputs)
    for i in one_hot:
      if self.combiners[self.plan.input_table_map[i]] is None:
        outputs[i] = tf.squeeze(outputs[i], axis=1)  # [batch, 1, width] -> [batch, width]
    for i, shape in leading.items():
      outputs[i] = tf.reshape(outputs[i], tf.concat([shape, tf.shape(outputs[i])[1:]], axis=0))
    return [self._in_compute_dtype(out) for out in outputs]

  def _in_compute_dtype(self, out):
    """Under a mixed precision policy the tables stay float32 and the outputs come in the
    compute dtype, as a Keras Embedding's do."""
    dtype = tf.as_dtype(self.compute_dtype)
    if out.dtype == dtype or not dtype.is_floating:
      return out
    return tf.cast(out, dtype)

  def _call_bags(self, inputs):
    n_inputs = len(self.plan.input_table_map)
    if self.dp_input and len(inputs) != n_inputs:
      raise ValueError(f"DistributedEmbedding: expected {n_inputs} inputs; got {len(inputs)}.")
    if not self.dp_input and len(inputs) != len(self.local_input_indices):
      raise ValueError(f"DistributedEmbedding: with dp_input=False worker {self.rank} takes "
                       f"inputs {self.local_input_indices}; got {len(inputs)} tensors.")
    if self.world_size == 1:
      by_input = dict(zip(range(n_inputs) if self.dp_input else self.local_input_indices, inputs))
      entries = [(self._shard_index(t), i) for i, t in enumerate(self.plan.input_table_map)]
      return self._local_lookups(entries, by_input)

    comm = self.communicator
    outputs = [None] * n_inputs
    if self.dp_input:
      local_ids = [self._check_dp_ids(i, x) for i, x in enumerate(inputs)]
      local_batch = _rows(local_ids[0])
      global_ids = {}
      for i, t in enumerate(self.plan.input_table_map):
        if t in self.plan.data_parallel_tables:
          outputs[i] = self._lookup(self._replicated_vars[t], local_ids[i], self.combiners[t])
        elif isinstance(local_ids[i], tf.RaggedTensor):
          # Bags of any length: the values travel by a variable-size all-gather.
          x = local_ids[i]
          global_ids[i] = tf.RaggedTensor.from_row_lengths(comm.all_gather_v(x.values),
                                                           comm.all_gather(x.row_lengths()),
                                                           validate=False)
        else:
          global_ids[i] = comm.all_gather(local_ids[i])
    else:
      global_ids = dict(zip(self.local_input_indices, inputs))
      global_batch = inputs[0].shape[0] if inputs else None
      if global_batch is not None and global_batch % self.world_size:
        raise ValueError(f"DistributedEmbedding: the global batch ({global_batch}) is not "
                         f"divisible by the number of workers ({self.world_size}); it must divide "
                         f"evenly among {self.world_size} workers.")
      local_batch = _rows(inputs[0]) // self.world_size if inputs else None

    # Row slices: partial sums over this worker's rows, summed across workers.
    for s, (var, _) in zip(self.local_shards, self._slots):
      if s.kind != "row_slice":
        continue
      for i in self._inputs_of_table[s.table]:
        ids = global_ids[i]
        combiner = self.combiners[s.table]
        count = (ids.row_lengths()[:, tf.newaxis] if isinstance(ids, tf.RaggedTensor) else
                 tf.shape(ids)[1])
        # Ids of other workers' rows fall outside this slice and are skipped.
        partial = self._lookup(var, _add_to_ids(ids, -s.row_begin),
                               "sum" if combiner == "mean" else combiner, bounds_check="skip")
        total = comm.all_reduce(partial)
        if combiner == "mean":
          total = total / tf.cast(tf.maximum(count, 1), total.dtype)
        start = self.rank * local_batch
        outputs[i] = total[start:start + local_batch]

    # Whole tables and column slices: look up the global batch, one all-to-all back.
    pieces = self._exchange_layout()
    if pieces["max_width"] > 0:
      entries = [(self.local_shards.index(s), i) for s, i in pieces["per_worker"][self.rank]]
      sends = [self._flatten(out) for out in self._local_lookups(entries, global_ids)]
      width = sum(pieces["widths"][self.rank])
      send = tf.concat(sends, axis=1) if sends else tf.zeros(
          [local_batch * self.world_size, 0], self.compute_dtype)
      send = tf.pad(send, [[0, 0], [0, pieces["max_width"] - width]])
      send = tf.reshape(send, [self.world_size, local_batch, pieces["max_width"]])
      received = comm.all_to_all(send)
      assembled = {}
      for source in range(self.world_size):
        offset = 0
        for (s, i), w in zip(pieces["per_worker"][source], pieces["widths"][source]):
          assembled.setdefault(i, []).append((s.col_begin, received[source, :, offset:offset + w]))
          offset += w
      for i, parts in assembled.items():
        parts.sort(key=lambda p: p[0])
        outputs[i] = self._unflatten(i, [p[1] for p in parts], local_batch)
    return outputs

  def _local_lookups(self, entries, ids_of):
    """Outputs of (local shard index, input index) `entries`, in order. Pooled lookups into one
    fused variable run as a single kernel call over the concatenated bags."""
    outputs = [None] * len(entries)
    fusable = {}
    for e, (k, i) in enumerate(entries):
      var, offset = self._slots[k]
      combiner = self.combiners[self.local_shards[k].table]
      ids = self._shifted(ids_of[i], var, offset, self.local_shards[k].rows, i)
      if combiner is not None and self._fused_count[id(var)] > 1 and _is_bag_batch(ids):
        fusable.setdefault((id(var), combiner), (var, []))[1].append((e, ids))
      else:
        outputs[e] = self._lookup(var, ids, combiner)
    for (_, combiner), (var, members) in fusable.items():
      if len(members) == 1:
        (e, ids), = members
        outputs[e] = self._lookup(var, ids, combiner)
        continue
      pooled = self._lookup(var, _concat_bags([ids for _, ids in members]), combiner)
      sizes = tf.stack([tf.cast(_rows(ids), tf.int64) for _, ids in members])
      for (e, _), out in zip(members, tf.split(pooled, sizes, axis=0)):
        outputs[e] = out
    return outputs

  def _shifted(self, ids, var, offset, rows, i):
    """`ids` of a shard starting at row `offset` of `var`. In a fused variable an id outside the
    shard would read a neighbour's rows, so those ids are checked against the shard here."""
    if self._fused_count[id(var)] == 1:
      return ids
    if not isinstance(ids, (tf.RaggedTensor, tf.SparseTensor)):
      ids = tf.convert_to_tensor(ids)
    values = ids.values if isinstance(ids, (tf.RaggedTensor, tf.SparseTensor)) else ids
    with tf.control_dependencies(embedding_lookup_ops.row_id_checks(
        values, rows, f"DistributedEmbedding: ids of input {i}",
        f"{rows} (its table's input_dim)")):
      return _add_to_ids(ids, offset)

  def _check_dp_ids(self, i, x):
    """Input `i` as dense, ragged (sparse converted) or replicated-table ids; errors name it."""
    if isinstance(x, tf.SparseTensor):
      if x.shape.rank != 2:
        raise ValueError(f"DistributedEmbedding: sparse input {i} must be 2-D; got shape "
                         f"{x.shape}.")
      if self.plan.input_table_map[i] in self.plan.data_parallel_tables:
        return x
      x = tf.RaggedTensor.from_sparse(x)
    if isinstance(x, tf.RaggedTensor):
      t = self.plan.input_table_map[i]
      if t not in self.plan.data_parallel_tables and (self.combiners[t] is None or
                                                      x.ragged_rank != 1 or x.shape.rank != 2):
        raise ValueError(f"DistributedEmbedding: ragged or sparse input {i} of a sharded table "
                         f"must be 2-D and its table must have a combiner ('sum' or 'mean'); "
                         f"got shape {x.shape}, combiner {self.combiners[t]!r}.")
      return x
    x = tf.convert_to_tensor(x)
    if self.plan.input_table_map[i] not in self.plan.data_parallel_tables and x.shape.rank != 2:
      raise ValueError(f"DistributedEmbedding: with several workers, dense input {i} of a "
                       f"sharded table must be 2-D [batch, hotness]; got shape {x.shape}.")
    return x

  def _shard_index(self, table):
    for k, s in enumerate(self.local_shards):
      if s.table == table:
        return k
    raise ValueError(f"table {table} is not on worker {self.rank}")

  def _exchange_layout(self):
    """Per worker, the (shard, input) pieces it sends, their flattened widths, the widest."""
    per_worker, widths = [], []
    for worker in self.plan.shards:
      entries, w = [], []
      for s in worker:
        if s.kind == "row_slice":
          continue
        for i in self._inputs_of_table[s.table]:
          entries.append((s, i))
          w.append(s.width * self._hotness_factor(i))
      per_worker.append(entries)
      widths.append(w)
    return {"per_worker": per_worker, "widths": widths,
            "max_width": max((sum(w) for w in widths), default=0)}

  def exchange_bytes_per_step(self, local_batch, bytes_per_element=4):
    """Activation bytes all workers together send per training step (forward and backward) in
    the all-to-all, and the minimum: each piece's rows sent once to each worker that needs them.
    Ours pads every worker's send block to the widest one, so the ratio is that padding. Ids,
    row-slice all-reduces and data-parallel gradients are not counted."""
    pieces = self._exchange_layout()
    n = self.world_size
    padded = 2 * n * (n - 1) * local_batch * pieces["max_width"] * bytes_per_element
    minimum = 2 * (n - 1) * local_batch * sum(map(sum, pieces["widths"])) * bytes_per_element
    return {"all_to_all": padded, "minimum": minimum}

  def _hotness_factor(self, i):
    """Values per id row in a flattened output: 1 with a combiner, the hotness without."""
    if self.combiners[self.plan.input_table_map[i]] is not None:
      return 1
    hotness = self._input_hotness.get(i)
    if hotness is None:
      raise ValueError(f"DistributedEmbedding: input {i} has no combiner, so its hotness "
                       "(last dimension) must be static.")
    return hotness

  def _unflatten(self, i, parts, local_batch):
    t = self.plan.input_table_map[i]
    if self.combiners[t] is not None:
      return tf.concat(parts, axis=1)
    hotness = self._input_hotness[i]
    parts = [tf.reshape(p, [local_batch, hotness, -1]) for p in parts]
    return tf.concat(parts, axis=2)

  def __call__(self, inputs, *args, **kwargs):
    inputs = list(inputs)
    indices = range(len(inputs)) if self.dp_input else self.local_input_indices
    # Keras tensors (functional models) have tuple shapes.
    self._input_hotness = {
        i: (None if isinstance(x, (tf.RaggedTensor, tf.SparseTensor)) else
            1 if len(x.shape) == 1 else x.shape[-1]) for i, x in zip(indices, inputs)}
    return super().__call__(inputs, *args, **kwargs)

  # ---- weights ----------------------------------------------------------------------------

  def get_weights(self, all_ranks=False):
    """The full global tables, in table order, on every worker (collective: call on all).
    `all_ranks` is accepted for the reference API: every worker gets the tables either way."""
    del all_ranks
    if not self.built:
      self.build()
    return self._global_tables({id(v): v for v in self._all_vars()})

  def set_weights(self, weights, chunk=_SET_WEIGHTS_CHUNK, use_lock=False):
    """Takes the full global tables (any worker count wrote them); keeps this worker's shards.

    Args:
      weights: One table per embedding, in table order: arrays, or paths of `.npy` files, which
        are memory-mapped so that a worker reads only the rows of its own shards.
      chunk: At most this many elements are written to a variable at a time, which bounds the
        temporary memory of loading a large table.
      use_lock: Accepted for the reference API, which serializes workers' file reads with it;
        memory-mapped reads of each worker's own rows need no lock.
    """
    del use_lock
    if not self.built:
      # As in the reference API and Keras: a layer has no weights to set before it is built.
      raise ValueError(f"set_weights: {self.name} is not built yet; call it on inputs or call "
                       "build() first.")
    if not isinstance(chunk, (int, np.integer)) or isinstance(chunk, bool) or chunk < 1:
      raise ValueError(f"set_weights: 'chunk' must be a positive integer; got {chunk!r}.")
    weights = [np.load(w, mmap_mode="r") if isinstance(w, (str, os.PathLike)) else w
               for w in weights]
    self._set_global_tables({id(v): v for v in self._all_vars()}, weights, "set_weights",
                            int(chunk))

  def get_optimizer_slots(self, optimizer):
    """{slot name: global tables} of `optimizer`'s per-row state for this layer's tables (e.g.
    Adagrad's accumulators), assembled like get_weights. Collective: call on all workers."""
    return {name: self._global_tables(by_var)
            for name, by_var in sorted(self._slot_variables(optimizer).items())}

  def set_optimizer_slots(self, optimizer, slots):
    """Loads what get_optimizer_slots returned, written by any worker count."""
    own = self._slot_variables(optimizer)
    if set(own) != set(slots):
      raise ValueError(f"set_optimizer_slots: the optimizer has slots {sorted(own)}; got "
                       f"{sorted(slots)}.")
    for name, tables in slots.items():
      self._set_global_tables(own[name], tables, f"set_optimizer_slots[{name!r}]")

  def _all_vars(self):
    return self._shard_vars + [self._replicated_vars[t] for t in sorted(self._replicated_vars)]

  def _slot_variables(self, optimizer):
    """{slot name: {id(layer variable): optimizer variable}}; a slot has its variable's shape."""
    if not self.built:
      self.build()
    if not optimizer.built:
      optimizer.build(self.trainable_variables)
    slots = {}
    for var in self._all_vars():
      prefix = _slot_prefix(var)
      for slot in optimizer.variables:
        if slot.name.startswith(prefix) and tuple(slot.shape) == tuple(var.shape):
          slots.setdefault(slot.name[len(prefix):], {})[id(var)] = slot
    missing = [name for name, by_var in slots.items() if len(by_var) != len(self._all_vars())]
    if missing:
      raise ValueError(f"optimizer slots {missing} do not cover every table of {self.name}.")
    return slots

  def _global_tables(self, by_var):
    """Global tables from `by_var` (id of one of this layer's variables -> a variable of the
    same shape: the weights themselves or an optimizer slot)."""
    # One read per variable (fused tables share one), without the whole-variable copy a read
    # makes in copy-on-read mode.
    values = {}

    def value_of(var):
      if id(var) not in values:
        values[id(var)] = embedding_lookup_ops.read_var_no_copy(by_var[id(var)]).numpy()
      return values[id(var)]

    tables = []
    for t, spec in enumerate(self.plan.tables):
      if t in self._replicated_vars:
        tables.append(np.array(value_of(self._replicated_vars[t])))
        continue
      # Every worker contributes, shards or not, so the dtype is the layer's, not a variable's.
      full = np.zeros((spec.input_dim, spec.output_dim), np.dtype(self.variable_dtype))
      for s, (var, offset) in zip(self.local_shards, self._slots):
        if s.table == t:
          full[s.row_begin:s.row_end, s.col_begin:s.col_end] = \
              value_of(var)[offset:offset + s.rows]
      tables.append(self.communicator.all_reduce(tf.constant(full)).numpy())
    return tables

  def _set_global_tables(self, by_var, tables, what, chunk=_SET_WEIGHTS_CHUNK):
    if len(tables) != len(self.plan.tables):
      raise ValueError(f"{what}: expected {len(self.plan.tables)} tables; got {len(tables)}.")
    for t, (table, spec) in enumerate(zip(tables, self.plan.tables)):
      if tuple(np.shape(table)) != (spec.input_dim, spec.output_dim):
        raise ValueError(f"{what}: table {t} must be {(spec.input_dim, spec.output_dim)}; "
                         f"got {np.shape(table)}.")

    def assign_rows(var, first, source):
      """var[first:first + len(source)] = source, at most `chunk` elements at a time."""
      var = _tf_variable(var)
      rows_per_chunk = max(1, chunk // max(1, int(np.prod(source.shape[1:]))))
      for begin in range(0, source.shape[0], rows_per_chunk):
        part = np.asarray(source[begin:begin + rows_per_chunk], var.dtype.as_numpy_dtype)
        var[first + begin:first + begin + part.shape[0]].assign(part)

    tables = [np.asarray(table) for table in tables]  # a memory map stays one, unread
    for s, (var, offset) in zip(self.local_shards, self._slots):
      assign_rows(by_var[id(var)], offset,
                  tables[s.table][s.row_begin:s.row_end, s.col_begin:s.col_end])
    for t, var in self._replicated_vars.items():
      assign_rows(by_var[id(var)], 0, tables[t])


def _reduce_gradients(grads, variables, communicator):
  """Sharded-table gradients scaled by 1 / world_size (complete on their owner, and each worker's
  loss is a mean over its local batch); every other gradient averaged over the workers."""
  n = communicator.world_size
  out = []
  for g, v in zip(grads, variables):
    if g is None or n == 1:
      out.append(g)
    elif is_model_parallel(v):
      out.append(tf.IndexedSlices(g.values / n, g.indices, g.dense_shape)
                 if isinstance(g, tf.IndexedSlices) else g / n)
    else:
      out.append(communicator.all_reduce(tf.convert_to_tensor(g), op="mean"))
  return out


def _unique_rows(gradient, dtype):
  """A sparse gradient's row indices, each once, and its values summed per row in `dtype` (the
  variable's, as Keras's dense gradient would be: float16 pieces under mixed precision would lose
  the small ones)."""
  indices, positions = tf.unique(gradient.indices)
  values = tf.math.unsorted_segment_sum(tf.cast(gradient.values, dtype), positions,
                                        tf.shape(indices)[0])
  return indices, values


def _sparse_adagrad_step(optimizer, gradient, variable, learning_rate):
  """Keras Adagrad's update on the rows a sparse gradient touches only.

  Keras 3 applies even an `IndexedSlices` gradient with whole-variable ops (the square root of
  the whole accumulator every step), which for a large table costs more than the rest of the
  step. A row without gradient is left unchanged by that update (its accumulator gains 0 and
  its step is 0), so updating only the touched rows, with the same float operations in the same
  order, gives the same variable and accumulator when each id appears once. Repeated ids are
  summed before squaring (the Adagrad rule, and legacy tf.keras's); Keras 3 squares each piece.
  """
  # pylint: disable=protected-access
  accumulator = optimizer._accumulators[optimizer._get_variable_index(variable)]
  accumulator = _tf_variable(accumulator)
  variable = _tf_variable(variable)
  lr = tf.cast(learning_rate, variable.dtype)
  indices, values = _unique_rows(gradient, variable.dtype)
  new_accumulator = tf.gather(accumulator, indices) + tf.square(values)
  accumulator.scatter_update(tf.IndexedSlices(new_accumulator, indices))
  variable.scatter_sub(
      tf.IndexedSlices((lr * values) / tf.sqrt(new_accumulator + optimizer.epsilon), indices))


def _lazy_adam_step(optimizer, gradient, variable, learning_rate):
  """Lazy Adam: Keras Adam's update on the rows a sparse gradient touches only.

  Unlike Adagrad this changes the numbers: Keras decays every row's moments each step and moves
  rows that had a gradient earlier, while here untouched rows keep their moments and values (the
  rule of TF1's LazyAdamOptimizer and of FBGEMM's and SOK's Adam). Touched rows go through
  Keras's operations in Keras's order, with the step count and bias correction of the whole
  optimizer, so a gradient that touches every row gives Keras's result.
  """
  # pylint: disable=protected-access
  index = optimizer._get_variable_index(variable)
  momentum = _tf_variable(optimizer._momentums[index])
  velocity = _tf_variable(optimizer._velocities[index])
  variable = _tf_variable(variable)
  dtype = variable.dtype
  lr = tf.cast(learning_rate, dtype)
  local_step = tf.cast(optimizer.iterations + 1, dtype)
  beta_1_power = tf.pow(tf.cast(optimizer.beta_1, dtype), local_step)
  beta_2_power = tf.pow(tf.cast(optimizer.beta_2, dtype), local_step)
  alpha = lr * tf.sqrt(1 - beta_2_power) / (1 - beta_1_power)
  indices, values = _unique_rows(gradient, dtype)
  m = tf.gather(momentum, indices)
  m = m + (values - m) * (1 - optimizer.beta_1)
  v = tf.gather(velocity, indices)
  v = v + (tf.square(values) - v) * (1 - optimizer.beta_2)
  momentum.scatter_update(tf.IndexedSlices(m, indices))
  velocity.scatter_update(tf.IndexedSlices(v, indices))
  if optimizer.amsgrad:
    velocity_hat = _tf_variable(optimizer._velocity_hats[index])
    v = tf.maximum(tf.gather(velocity_hat, indices), v)
    velocity_hat.scatter_update(tf.IndexedSlices(v, indices))
  variable.scatter_sub(tf.IndexedSlices((m * alpha) / (tf.sqrt(v) + optimizer.epsilon), indices))


# Rows-only updates that change the numbers, used only when asked for (`lazy_sparse_updates`).
_LAZY_UPDATE_STEPS = {keras.optimizers.Adam: _lazy_adam_step}


# Optimizers whose update of a sparse gradient DistributedOptimizer replaces by one that touches
# only the gradient's rows (same result for unique ids). Exact types: a subclass may change the
# rule.
# Not here: Adam, RMSprop and SGD with momentum, whose Keras updates move every row each step
# (decaying moments), so a rows-only update would change the numbers (Adam's is opt-in, above).
_SPARSE_UPDATE_STEPS = {keras.optimizers.Adagrad: _sparse_adagrad_step}


def _communicator(communicator, api):
  if communicator is not None and not isinstance(communicator, comm_lib.Communicator):
    raise TypeError(f"{api}: 'communicator' must be a Communicator or None; got "
                    f"{communicator!r}.")
  return communicator or comm_lib.default_communicator()


def _check_horovod_options(api, compression=None, gradient_predivide_factor=1.0,
                           backward_passes_per_step=1):
  """Horovod's options that would change the numbers must keep their defaults here."""
  if compression is not None and getattr(compression, "__name__",
                                         type(compression).__name__) != "NoneCompressor":
    raise ValueError(f"{api}: 'compression' is not supported (gradients travel uncompressed); "
                     f"got {compression!r}.")
  if gradient_predivide_factor != 1.0:
    raise ValueError(f"{api}: 'gradient_predivide_factor' must be 1.0; got "
                     f"{gradient_predivide_factor!r}.")
  if backward_passes_per_step != 1:
    raise ValueError(f"{api}: 'backward_passes_per_step' must be 1 (gradients are not "
                     f"accumulated locally); got {backward_passes_per_step!r}.")


class DistributedGradientTape:
  """Wraps a tf.GradientTape so that `gradient` returns the gradients of the global batch:
  sharded tables' gradients scaled, every other gradient averaged over the workers. Other tape
  methods (watched_variables, ...) pass through.

  The keyword arguments are the reference (Horovod) API's: `device_dense`, `device_sparse` and
  `sparse_as_dense` are accepted and have no effect (the communicator places the collectives, and
  averaged gradients are dense); `compression` and `gradient_predivide_factor` must keep their
  defaults.
  """

  def __init__(self, tape, communicator=None, *, device_dense="", device_sparse="",
               compression=None, sparse_as_dense=False, gradient_predivide_factor=1.0):
    del device_dense, device_sparse, sparse_as_dense
    _check_horovod_options("DistributedGradientTape", compression, gradient_predivide_factor)
    self._tape = tape
    self._comm = _communicator(communicator, "DistributedGradientTape")

  def gradient(self, target, sources, output_gradients=None,
               unconnected_gradients=tf.UnconnectedGradients.NONE):
    grads = self._tape.gradient(target, sources, output_gradients=output_gradients,
                                unconnected_gradients=unconnected_gradients)
    reduced = _reduce_gradients(tf.nest.flatten(grads), tf.nest.flatten(sources), self._comm)
    return tf.nest.pack_sequence_as(grads, reduced)

  def __getattr__(self, name):
    return getattr(self._tape, name)


def DistributedOptimizer(optimizer, communicator=None, *, name=None, device_dense="",
                         device_sparse="", compression=None, sparse_as_dense=False,
                         gradient_predivide_factor=1.0, backward_passes_per_step=1,
                         average_aggregated_gradients=False,
                         lazy_sparse_updates=False):  # pylint: disable=invalid-name
  """A new optimizer, built from `optimizer`'s config, that reduces gradients across workers
  before applying them (as DistributedGradientTape does), so `model.fit` trains on the global
  batch. As in the reference API, `optimizer` itself is left as it was; since its state would not
  carry over, wrapping one that has already been used is an error.

  With Keras's `Adagrad`, a sparse gradient (an embedding table's `IndexedSlices`) updates only
  the rows it touches; Keras's own update runs over the whole table every step and, for a
  gradient with each id once, gives the same numbers (repeated ids are summed before squaring
  here, as the Adagrad rule says; Keras 3 squares each piece). Other optimizers apply their own
  rules unchanged, unless `lazy_sparse_updates=True`: then Keras's `Adam` also updates only the
  rows a sparse gradient touches, and rows without gradient keep their moments (lazy Adam, as
  TF1's LazyAdamOptimizer and FBGEMM do). That changes the results, hence opt-in; it is an error
  for other optimizers.

  The keyword arguments are the reference (Horovod) API's: `name`, `device_dense`,
  `device_sparse`, `sparse_as_dense` and `average_aggregated_gradients` are accepted and have no
  effect here; `compression`, `gradient_predivide_factor` and `backward_passes_per_step` must keep
  their defaults.
  """
  del name, device_dense, device_sparse, sparse_as_dense, average_aggregated_gradients
  _check_horovod_options("DistributedOptimizer", compression, gradient_predivide_factor,
                         backward_passes_per_step)
  comm = _communicator(communicator, "DistributedOptimizer")
  if not isinstance(optimizer, keras.optimizers.Optimizer):
    raise TypeError(f"DistributedOptimizer: 'optimizer' must be a Keras optimizer; got "
                    f"{optimizer!r}.")
  if optimizer.built:
    raise ValueError("DistributedOptimizer: 'optimizer' has already been used (it has state); "
                     "wrap it before training.")
  if not isinstance(lazy_sparse_updates, bool):
    raise TypeError(f"DistributedOptimizer: 'lazy_sparse_updates' must be a bool; got "
                    f"{lazy_sparse_updates!r}.")
  base = type(optimizer)
  sparse_update_step = _SPARSE_UPDATE_STEPS.get(base)
  if lazy_sparse_updates:
    if base not in _LAZY_UPDATE_STEPS:
      raise ValueError(f"DistributedOptimizer: 'lazy_sparse_updates' is supported for "
                       f"{sorted(t.__name__ for t in _LAZY_UPDATE_STEPS)}; got "
                       f"{base.__name__}.")
    sparse_update_step = _LAZY_UPDATE_STEPS[base]

  class _DistributedOptimizer(base):

    def apply(self, grads, trainable_variables=None):  # pylint: disable=missing-function-docstring
      variables = trainable_variables if trainable_variables is not None else \
          self._trainable_variables
      return super().apply(_reduce_gradients(list(grads), list(variables), comm),
                           trainable_variables)

    def update_step(self, gradient, variable, learning_rate):  # pylint: disable=missing-function-docstring
      if sparse_update_step is not None and isinstance(gradient, tf.IndexedSlices):
        return sparse_update_step(self, gradient, variable, learning_rate)
      return super().update_step(gradient, variable, learning_rate)

  _DistributedOptimizer.__name__ = base.__name__
  _DistributedOptimizer.__qualname__ = base.__qualname__
  return _DistributedOptimizer.from_config(optimizer.get_config())


def broadcast_variables(variables, root_rank=0, communicator=None):
  """Gives every worker `root_rank`'s values of `variables`, skipping sharded tables (each worker
  owns different shards). Call on every worker."""
  comm = _communicator(communicator, "broadcast_variables")
  for v in variables:
    if not is_model_parallel(v):
      v.assign(comm.broadcast(tf.convert_to_tensor(v), root_rank))


class BroadcastGlobalVariablesCallback(keras.callbacks.Callback):
  """Gives every worker `root_rank`'s replicated state at the end of the first training batch, as
  the reference (Horovod's) callback does: the model's variables and the optimizer's, except the
  sharded tables and their optimizer slots, which differ by design. By then the optimizer has
  built its slots, so random or restored state ends up the same on every worker. `device` is
  accepted for the reference API; the communicator places the broadcast.
  """

  def __init__(self, root_rank=0, communicator=None, *, device=""):
    super().__init__()
    del device
    self.root_rank = root_rank
    self.communicator = _communicator(communicator, "BroadcastGlobalVariablesCallback")
    self.broadcast_done = False

  def on_train_batch_end(self, batch, logs=None):
    if self.broadcast_done:
      return
    variables = list(self.model.variables)
    optimizer = getattr(self.model, "optimizer", None)
    if optimizer is not None:
      sharded = tuple(_slot_prefix(v) for v in variables if is_model_parallel(v))
      variables += [v for v in optimizer.variables if not v.name.startswith(sharded)]
    broadcast_variables(variables, root_rank=self.root_rank, communicator=self.communicator)
    self.broadcast_done = True
