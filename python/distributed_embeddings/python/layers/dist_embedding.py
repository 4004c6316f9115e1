"""Model-parallel embeddings: tables sharded across workers, activations moved with all-to-all.

`DistributedEmbedding` wraps a list of embedding layers. The planner (planner.py) places each
table whole, in column slices, in row slices or replicated; every worker then holds only its own
shards. A forward pass with several workers runs:

1. A check that every worker can go on (one small all-gather): each worker sends a fingerprint
   of the plan and of its inputs' structure, its batch, and the first invalid id or malformed
   input it holds. Every worker then raises the same error, or none does, before any other
   collective starts; a failed check leaves the collectives usable.
2. With data-parallel input (`dp_input=True`, each worker has its local batch of every input):
   the ids of sharded tables are all-gathered in two collectives, one int64 matrix (dense ids
   and the row lengths of ragged ones) and one flat vector (ragged values). With `dp_input=False`
   every worker already holds the global batch of its own inputs.
3. Each worker looks up its shards for the global batch; one all-to-all returns every worker the
   rows of its own local batch (column slices reassembled). Row slices give partial sums over
   their rows, all-reduced in one collective.
Backward runs the exchanges in reverse, so each shard receives its sparse gradient locally.
Replicated (data-parallel) tables are looked up locally; their gradients are averaged by the
training API (distributed_training.py).

The global batch is laid out in blocks of one size per worker, the size class of the largest
local batch (communicator.size_class), so local batches may differ between workers and from step
to step, also inside one traced function: every collective's shape follows from the size class,
which picks its instance key. Rows that pad a block are empty bags: they touch no table row.

On each worker, whole tables and column slices of one width are stored in one variable and
their pooled lookups run as one kernel call (fusion), which matters when a model has dozens of
small tables. With one worker the layer is a plain set of lookups.
"""

import dataclasses
import hashlib
import os

import keras
import numpy as np
import tensorflow as tf

from distributed_embeddings.python.layers import planner as planner_lib
from distributed_embeddings.python.ops import embedding_lookup_ops
from distributed_embeddings.python.ops import id_formats
from distributed_embeddings.python.parallel import communicator as comm_lib
from distributed_embeddings.python.training import distributed_training
from distributed_embeddings.python.training import sparse_updates

# Elements written to a variable at a time by set_weights (the reference API's default).
_SET_WEIGHTS_CHUNK = 134217728

# The most elements tables are stacked to in one shared variable (32 MiB of float32); a larger
# table keeps a variable of its own. Keras 3 optimizers apply even a sparse gradient with some
# whole-variable ops (Adagrad: sqrt(accumulator + epsilon)), so each step allocates temporaries the
# size of the variable, and above glibc's 32 MiB mmap ceiling every one of them is fresh memory
# that page-faults in (BENCHMARKS.md has the cost). Lookups gain little from larger stacks.
_MAX_FUSED_ELEMENTS = 8 * 2**20

# Fields of the check every worker sends before a forward pass (one int64 each).
_F_VERSION, _F_WORLD, _F_PLAN, _F_FEED, _F_BATCH, _F_VALUES = range(6)
_F_ERROR, _F_INPUT, _F_POSITION, _F_VALUE = range(6, 10)
_CHECK_FIELDS = 10
_CHECK_VERSION = 1
_NO_ERROR, _BAD_ID, _MALFORMED, _UNEQUAL_BATCH, _STRUCTURE = 0, 1, 2, 3, 4

# Collective instance keys of one layer's call sites, reserved when it is created: the check,
# the id and value gathers, and the row-slice all-reduce and the all-to-all with their
# gradients. A second call of the layer in one traced function takes further keys then.
_SITE_KEYS = {
  "check#0": 1,
  "ids#0": comm_lib.SIZE_CLASSES,
  "values#0": comm_lib.SIZE_CLASSES,
  "row_slices#0": 2 * comm_lib.SIZE_CLASSES,
  "exchange#0": 2 * comm_lib.SIZE_CLASSES,
}


def _fingerprint(*parts):
  """A stable 62-bit digest of `parts`' repr (the same on every worker, unlike hash())."""
  digest = hashlib.sha256(repr(parts).encode()).digest()
  return int.from_bytes(digest[:8], "little") >> 2


@dataclasses.dataclass(frozen=True)
class Piece:
  """What one worker sends for one (shard, input) pair: `width` values per row of the batch."""

  shard: planner_lib.Shard
  input_index: int
  width: int


@dataclasses.dataclass(frozen=True)
class ExchangeLayout:
  """Per worker, the pieces of its all-to-all block, in order."""

  pieces: tuple

  @property
  def block_widths(self):
    return [sum(p.width for p in worker) for worker in self.pieces]

  @property
  def max_width(self):
    return max(self.block_widths, default=0)


@dataclasses.dataclass
class _Feed:
  """One input as this worker was fed it, brought to the form the exchange needs.

  kind: 'dense' (static hotness; 1-D ids are 'dense' of hotness 1 with `one_hot`), 'ragged'
  (ragged or sparse ids, or dense ids of unknown hotness), or 'replicated' (an input of a
  replicated table, looked up locally as given).
  """

  index: int
  kind: str
  original: object
  batch: tf.Tensor
  ids: tf.Tensor = None  # dense: [batch, hotness] int64; ragged: flat values, int64
  lengths: tf.Tensor = None  # ragged: [batch] int64
  hotness: int = 1
  one_hot: bool = False
  structure_ok: tf.Tensor = None
  # Per-id weights, or None: `original_weights` as fed (the structure of `original`), `weights`
  # aligned with `ids` (dense: [batch, hotness]; ragged: flat), in the variables' dtype.
  original_weights: object = None
  weights: tf.Tensor = None


def _padded_rows(tensor, parts):
  """`tensor` as `parts` rows, each flattened and padded to the size class of its length;
  returns (rows, class, length). A collective on these rows sees a shape that follows from
  the class alone, whatever the batch or the widths, so the class can pick its instance key
  and one key never sees two shapes."""
  rows = tf.reshape(tensor, [parts, -1])
  length = tf.shape(rows, out_type=tf.int64)[1]
  index, padded = comm_lib.size_class(length)
  return tf.pad(rows, [[0, 0], [0, padded - length]]), index, length


def _after(feed, dependency):
  """`feed` with every tensor computed only once `dependency` is."""

  def wait(x):
    if x is None:
      return None
    with tf.control_dependencies([dependency]):
      if isinstance(x, tf.RaggedTensor):
        return tf.RaggedTensor.from_row_splits(
          tf.identity(x.values), tf.identity(x.row_splits), validate=False
        )
      if isinstance(x, tf.SparseTensor):
        return tf.SparseTensor(
          tf.identity(x.indices), tf.identity(x.values), tf.identity(x.dense_shape)
        )
      return tf.identity(x)

  return dataclasses.replace(
    feed,
    original=wait(feed.original),
    ids=wait(feed.ids),
    lengths=wait(feed.lengths),
    batch=wait(feed.batch),
    original_weights=wait(feed.original_weights),
    weights=wait(feed.weights),
  )


def _weights_as_ids(weights):
  """Float weights as int64 (their bits), to travel in the ids' collectives."""
  if weights.dtype == tf.float64:
    return tf.bitcast(weights, tf.int64)
  return tf.cast(tf.bitcast(tf.cast(weights, tf.float32), tf.int32), tf.int64)


def _weights_from_ids(bits, dtype):
  if dtype == tf.float64:
    return tf.bitcast(bits, tf.float64)
  return tf.cast(tf.bitcast(tf.cast(bits, tf.int32), tf.float32), dtype)


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

  def __init__(
    self,
    embeddings,
    strategy="basic",
    column_slice_threshold=None,
    row_slice_threshold=None,
    dp_input=True,
    input_table_map=None,
    data_parallel_threshold=None,
    gpu_embedding_size=None,
    communicator=None,
    **kwargs,
  ):
    super().__init__(autocast=False, **kwargs)
    self.supports_jit = False  # Custom ops and collectives: no XLA.
    self.communicator = distributed_training._communicator(  # pylint: disable=protected-access
      communicator, "DistributedEmbedding"
    )
    self.world_size = self.communicator.world_size
    self.rank = self.communicator.rank
    if not isinstance(dp_input, bool):
      raise TypeError(f"DistributedEmbedding: 'dp_input' must be a bool; got {dp_input!r}.")
    self.dp_input = dp_input
    self.gpu_embedding_size = gpu_embedding_size
    configs, _ = planner_lib.table_configs(embeddings)
    self.table_configs = configs
    self.combiners = [c.get("combiner") for c in configs]
    self.strategy = planner_lib.DistEmbeddingStrategy(
      embeddings,
      self.world_size,
      strategy,
      input_table_map,
      column_slice_threshold,
      row_slice_threshold,
      data_parallel_threshold,
      gpu_embedding_size,
    )
    self.plan = self.strategy.plan
    if (
      not dp_input
      and self.world_size > 1
      and (
        self.plan.data_parallel_tables
        or any(s.kind == "row_slice" for w in self.plan.shards for s in w)
      )
    ):
      raise ValueError(
        "dp_input=False supports whole and column-sliced tables only; drop "
        "row_slice_threshold and data_parallel_threshold."
      )
    self.local_shards = self.plan.shards[self.rank]
    self._inputs_of_table = self.strategy.inputs_of_table
    # Inputs this worker must be fed with dp_input=False: those of its shards' tables.
    self.local_input_indices = self.strategy.input_ids_list[self.rank]
    self._plan_fingerprint = _fingerprint(
      self.world_size,
      self.dp_input,
      self.plan.tables,
      self.plan.input_table_map,
      self.plan.shards,
      self.plan.data_parallel_tables,
      self.combiners,
    )
    self._shard_vars = []
    self._slots = []
    self._fused_count = {}
    self._replicated_vars = {}
    if self.world_size > 1:
      distributed_training.register_sharded_layer(self)
      # Its collectives' instance keys, reserved now: every worker builds its layers in the same
      # order, whatever happens in their calls.
      self.communicator.reserve_keys_for(self, _SITE_KEYS)

  # ---- variables -----------------------------------------------------------------------------

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
        var = self.add_weight(
          shape=(s.rows, s.width),
          initializer=self._initializer(s.table),
          name=f"table{s.table}_r{s.row_begin}_c{s.col_begin}",
        )
        self._slots[k] = (var, 0)
        self._fused_count[id(var)] = 1
        continue
      by_width = groups.setdefault(s.width, [[]])
      if (
        by_width[-1]
        and (sum(self.local_shards[m].rows for m in by_width[-1]) + s.rows) * s.width
        > _MAX_FUSED_ELEMENTS
      ):
        by_width.append([])
      by_width[-1].append(k)
    groups = [(width, members) for width, split in sorted(groups.items()) for members in split]
    for width, members in groups:
      parts = [
        (self.local_shards[k].rows, self._initializer(self.local_shards[k].table)) for k in members
      ]
      tables = "_".join(str(self.local_shards[k].table) for k in members)

      def stacked(shape, dtype=None, parts=parts, width=width):
        del shape
        return tf.concat([init((rows, width), dtype=dtype) for rows, init in parts], axis=0)

      var = self.add_weight(
        shape=(sum(rows for rows, _ in parts), width),
        initializer=stacked,
        name=f"tables{tables}_w{width}",
      )
      self._fused_count[id(var)] = len(members)
      offset = 0
      for k, (rows, _) in zip(members, parts):
        self._slots[k] = (var, offset)
        offset += rows
    for var, _ in self._slots:
      if not any(var is v for v in self._shard_vars):
        self._shard_vars.append(var)
    for var in self._shard_vars:
      # The reference API marks shard variables with `de_local`; code that checks it still works
      # (the tf.Variable holding the value gets it too once Keras has created it; see call).
      var.de_local = True
    for t in self.plan.data_parallel_tables:
      spec = self.plan.tables[t]
      self._replicated_vars[t] = self.add_weight(
        shape=(spec.input_dim, spec.output_dim),
        initializer=self._initializer(t),
        name=f"table{t}_replicated",
      )
    for var in self.table_variables:
      sparse_updates.mark_embedding_table(var)
    self.built = True

  def _initializer(self, table):
    return keras.initializers.get(
      self.table_configs[table].get("embeddings_initializer", "uniform")
    )

  def sharded_variables(self):
    """The variables that hold this worker's shards (different on every worker); none with one
    worker, where nothing is sharded."""
    return list(self._shard_vars) if self.world_size > 1 else []

  @property
  def table_variables(self):
    """Every variable of the layer's tables on this worker: the shards, then the replicated
    tables in table order."""
    return self._shard_vars + [self._replicated_vars[t] for t in sorted(self._replicated_vars)]

  # ---- forward -------------------------------------------------------------------------------

  def call(self, inputs, weights=None):
    """Looks up `inputs` (a list, one per input of `input_table_map`). `weights`: None, or a
    list as long as `inputs` holding None or per-id weights of that input's structure (see
    `embedding_lookup`); with several workers weights are data and get no gradient."""
    inputs = list(inputs)
    n_inputs = len(self.plan.input_table_map)
    indices = list(range(n_inputs)) if self.dp_input else self.local_input_indices
    if weights is not None:
      weights = list(weights)
      if len(weights) != len(inputs):
        raise ValueError(
          f"DistributedEmbedding: 'weights' must hold one entry (None or a tensor) per input "
          f"({len(inputs)}); got {len(weights)}."
        )
    else:
      weights = [None] * len(inputs)
    if self.world_size == 1:
      self._check_input_count(inputs)
      outputs = self._call_one_worker(dict(zip(indices, inputs)), dict(zip(indices, weights)))
      return [self._in_compute_dtype(out) for out in outputs]
    for var in self._shard_vars:
      inner = sparse_updates.backing_variable(var)
      if inner is not var:
        inner.de_local = True
    # A mistake found here, before any collective, must still reach the other workers, or
    # they would wait for this one in the check until the collective timeout.
    at = -1
    try:
      self._check_input_count(inputs)
      feeds = []
      for at, x, w in zip(indices, inputs, weights):
        feeds.append(self._feed(at, x, w))
      at = -1
      self._check_static_batch(feeds)
    except (ValueError, TypeError) as error:
      return self._fail_together(error, at)
    outputs = self._call_workers(feeds)
    return [self._in_compute_dtype(out) for out in outputs]

  def _check_input_count(self, inputs):
    n_inputs = len(self.plan.input_table_map)
    if self.dp_input and len(inputs) != n_inputs:
      raise ValueError(f"DistributedEmbedding: expected {n_inputs} inputs; got {len(inputs)}.")
    if not self.dp_input and len(inputs) != len(self.local_input_indices):
      raise ValueError(
        f"DistributedEmbedding: with dp_input=False worker {self.rank} takes "
        f"inputs {self.local_input_indices}; got {len(inputs)} tensors."
      )

  def _check_static_batch(self, feeds):
    """With dp_input=False, a global batch whose shape shows it does not divide among the
    workers (the check finds the rest)."""
    if self.dp_input:
      return
    static = [f.original.shape[0] for f in feeds if f.original.shape[0] is not None]
    if static and static[0] % self.world_size:
      raise ValueError(
        f"DistributedEmbedding: the global batch ({static[0]}) is not "
        f"divisible by the number of workers ({self.world_size}); it must "
        f"divide evenly among {self.world_size} workers."
      )

  def _fail_together(self, error, index):
    """Sends the check with this worker's mistake, so that every worker fails at once: here
    with `error` itself, elsewhere with a ValueError (eagerly) naming this worker."""
    mine = tf.constant(
      [_CHECK_VERSION, self.world_size, self._plan_fingerprint, 0, -1, 0, _STRUCTURE, index, 0, 0],
      tf.int64,
    )
    gathered = self.communicator.all_gather(mine, site=self._site("check"))
    if tf.executing_eagerly():
      raise error
    # Traced: the function must still build; it fails when the check runs.
    # Always false, but only once the check has run everywhere.
    check = tf.debugging.Assert(
      tf.equal(tf.size(gathered), -1), [f"{type(error).__name__}: {error}"]
    )
    with tf.control_dependencies([check]):
      return [
        tf.zeros([0, self.plan.tables[t].output_dim], self.compute_dtype)
        for t in self.plan.input_table_map
      ]

  def _in_compute_dtype(self, out):
    """Under a mixed precision policy the tables stay float32 and the outputs come in the
    compute dtype, as a Keras Embedding's do."""
    dtype = tf.as_dtype(self.compute_dtype)
    if out is None or out.dtype == dtype or not dtype.is_floating:
      return out
    return tf.cast(out, dtype)

  def _lookup(self, variable, ids, combiner, bounds_check="error", weights=None):
    return embedding_lookup_ops.embedding_lookup(
      variable, ids, combiner=combiner, weights=weights, bounds_check=bounds_check
    )

  # One worker: the lookups of a plain set of Embedding layers, any dense rank included.

  def _call_one_worker(self, by_input, weights_by_input):
    one_hot, leading = set(), {}
    weights_of = {i: w for i, w in weights_by_input.items() if w is not None}
    for i, x in list(by_input.items()):
      if isinstance(x, (tf.RaggedTensor, tf.SparseTensor)):
        continue
      x = tf.convert_to_tensor(x)
      w = weights_of.get(i)
      if w is not None:
        w = embedding_lookup_ops.dense_weights(w, x, f"DistributedEmbedding: weights of input {i}")
      if x.shape.rank == 1:
        by_input[i] = x[:, tf.newaxis]
        one_hot.add(i)
        if w is not None:
          weights_of[i] = w[:, tf.newaxis]
      elif x.shape.rank is not None and x.shape.rank > 2:
        by_input[i] = tf.reshape(x, [-1, tf.shape(x)[-1]])
        leading[i] = tf.shape(x)[:-1]
        if w is not None:
          weights_of[i] = tf.reshape(w, [-1, tf.shape(x)[-1]])
      else:
        by_input[i] = x
    entries = [(self._shard_index(t), i) for i, t in enumerate(self.plan.input_table_map)]
    outputs = self._local_lookups(entries, by_input, check_fused=True, weights_of=weights_of)
    for i in one_hot:
      if self.combiners[self.plan.input_table_map[i]] is None:
        outputs[i] = tf.squeeze(outputs[i], axis=1)  # [batch, 1, width] -> [batch, width]
    for i, shape in leading.items():
      outputs[i] = tf.reshape(outputs[i], tf.concat([shape, tf.shape(outputs[i])[1:]], axis=0))
    return outputs

  def _shard_index(self, table):
    for k, s in enumerate(self.local_shards):
      if s.table == table:
        return k
    raise ValueError(f"table {table} is not on worker {self.rank}")

  def _local_lookups(self, entries, ids_of, check_fused=False, unit_bags=False, weights_of=None):
    """Outputs of (local shard index, input index) `entries`, in order. Pooled lookups into one
    fused variable run as a single kernel call over the concatenated bags (weighted ones run on
    their own). With `unit_bags` the ids of tables without a combiner come as bags of one id
    each, summed. `weights_of`: {input index: its per-id weights}."""
    weights_of = weights_of or {}
    outputs = [None] * len(entries)
    fusable = {}
    for e, (k, i) in enumerate(entries):
      var, offset = self._slots[k]
      shard = self.local_shards[k]
      combiner = self.combiners[shard.table]
      if combiner is None and unit_bags:
        combiner = "sum"
      ids = ids_of[i]
      if self._fused_count[id(var)] > 1:
        ids = self._shifted(ids, offset, shard.rows, i, check_fused)
      weights = weights_of.get(i)
      if (
        weights is None
        and combiner is not None
        and self._fused_count[id(var)] > 1
        and id_formats.is_bag_batch(ids)
      ):
        fusable.setdefault((id(var), combiner), (var, []))[1].append((e, ids))
      else:
        outputs[e] = self._lookup(var, ids, combiner, weights=weights)
    for (_, combiner), (var, members) in fusable.items():
      if len(members) == 1:
        ((e, ids),) = members
        outputs[e] = self._lookup(var, ids, combiner)
        continue
      pooled = self._lookup(var, id_formats.concat_bags([ids for _, ids in members]), combiner)
      sizes = tf.stack([id_formats.batch_size(ids) for _, ids in members])
      for (e, _), out in zip(members, tf.split(pooled, sizes, axis=0)):
        outputs[e] = out
    return outputs

  @staticmethod
  def _shifted(ids, offset, rows, i, check):
    """`ids` of a shard starting at row `offset` of a fused variable. An id outside the shard
    would read a neighbour's rows, so unless the ids were checked already (`check` False), they
    are checked against the shard here."""
    if not isinstance(ids, (tf.RaggedTensor, tf.SparseTensor)):
      ids = tf.convert_to_tensor(ids)
    if not check:
      return id_formats.add_to_ids(ids, offset)
    with tf.control_dependencies(
      embedding_lookup_ops.row_id_checks(
        id_formats.flat_ids(ids),
        rows,
        f"DistributedEmbedding: ids of input {i}",
        f"{rows} (its table's input_dim)",
      )
    ):
      return id_formats.add_to_ids(ids, offset)

  # Several workers.

  def _site(self, name):
    """This layer's collective call site `name` (keys that survive retracing; see
    Communicator.site)."""
    return self.communicator.site(self, name)

  def _replicated(self, i):
    return self.plan.input_table_map[i] in self.plan.data_parallel_tables

  def _feed(self, i, x, w=None):
    """Input `i` (and its weights `w`, or None) as fed, in the form the exchange needs;
    Python-level misuse raises here."""
    feed = self._feed_ids(i, x)
    if w is None:
      return feed
    x = feed.original
    w = embedding_lookup_ops.check_weights(
      x, w, f"DistributedEmbedding: weights of input {i}", "its ids"
    )
    feed.original_weights = w
    feed.structure_ok = tf.logical_and(feed.structure_ok, id_formats.weights_match(x, w))
    if feed.kind == "replicated":
      return feed
    if isinstance(w, (tf.RaggedTensor, tf.SparseTensor)):
      values = w.values
    elif feed.kind == "ragged":  # dense ids of unknown hotness, as ragged
      values = tf.reshape(w, [-1])
    elif feed.one_hot:
      values = w[:, tf.newaxis]
    else:
      values = w
    feed.weights = tf.cast(values, self.variable_dtype)
    return feed

  def _feed_ids(self, i, x):
    """Input `i` as fed, in the form the exchange needs; Python-level misuse raises here."""
    t = self.plan.input_table_map[i]
    combiner = self.combiners[t]
    if isinstance(x, tf.SparseTensor):
      if x.shape.rank != 2:
        raise ValueError(
          f"DistributedEmbedding: sparse input {i} must be 2-D; got shape {x.shape}."
        )
    elif not isinstance(x, tf.RaggedTensor):
      x = tf.convert_to_tensor(x)
    if not x.dtype.is_integer:
      raise TypeError(f"DistributedEmbedding: input {i} must hold integer ids; got {x.dtype.name}.")
    feed = _Feed(
      i, "replicated", x, id_formats.batch_size(x), structure_ok=id_formats.structure_ok(x)
    )
    if self._replicated(i):
      return feed
    if isinstance(x, (tf.RaggedTensor, tf.SparseTensor)):
      if (
        combiner is None
        or (isinstance(x, tf.RaggedTensor) and x.ragged_rank != 1)
        or x.shape.rank != 2
      ):
        raise ValueError(
          f"DistributedEmbedding: ragged or sparse input {i} of a sharded table "
          f"must be 2-D and its table must have a combiner ('sum', 'mean' or 'sqrtn'); "
          f"got shape {x.shape}, combiner {combiner!r}."
        )
      feed.kind = "ragged"
      if isinstance(x, tf.RaggedTensor):
        feed.ids = tf.cast(x.values, tf.int64)
        feed.lengths = tf.cast(x.row_lengths(), tf.int64)
      else:
        # Its lengths come after the check (_sparse_lengths): until then nothing may depend on
        # a dense_shape that could be anything.
        feed.ids = tf.cast(x.values, tf.int64)
      return feed
    if x.shape.rank == 1:
      feed.kind, feed.ids, feed.one_hot = "dense", tf.cast(x, tf.int64)[:, tf.newaxis], True
      return feed
    if x.shape.rank != 2:
      raise ValueError(
        f"DistributedEmbedding: with several workers, dense input {i} of a "
        f"sharded table must be 1-D [batch] or 2-D [batch, hotness]; got shape "
        f"{x.shape}."
      )
    if not self.dp_input and combiner is None:
      raise ValueError(
        f"DistributedEmbedding: with dp_input=False, input {i} of table {t} "
        "(no combiner) must be one-hot: 1-D ids [global_batch], giving "
        f"[local_batch, width]; got shape {x.shape}. Give the table a combiner "
        "for several ids per row."
      )
    if x.shape[1] is None:
      if combiner is None:
        raise ValueError(
          f"DistributedEmbedding: input {i} has no combiner, so its hotness "
          f"(last dimension) must be static; got shape {x.shape}."
        )
      ragged = tf.RaggedTensor.from_tensor(tf.cast(x, tf.int64), row_splits_dtype=tf.int64)
      feed.kind, feed.ids, feed.lengths = "ragged", ragged.values, ragged.row_lengths()
      return feed
    feed.kind, feed.ids, feed.hotness = "dense", tf.cast(x, tf.int64), int(x.shape[1])
    return feed

  def _feed_fingerprint(self, feeds):
    """What must agree between workers about their inputs' structure (dp_input=True)."""
    if not self.dp_input:
      return 0
    # Ragged and sparse ids both travel as CSR, so a mix of the two is fine.
    return _fingerprint(
      [
        (f.index, f.kind, f.hotness if f.kind == "dense" else -1, f.one_hot, f.weights is not None)
        for f in feeds
        if f.kind != "replicated"
      ]
    )

  def _local_status(self, feeds):
    """[error code, input, position, value] of this worker's first malformed input or, if none,
    its first id outside its table (int64 tensors; code 0 when all is well)."""
    if not feeds:
      return tf.zeros([4], tf.int64)
    malformed = tf.logical_not(tf.stack([f.structure_ok for f in feeds]))
    first_malformed = tf.argmax(tf.cast(malformed, tf.int32), output_type=tf.int64)
    ids = [
      tf.cast(
        id_formats.flat_ids(f.original) if f.kind == "replicated" else tf.reshape(f.ids, [-1]),
        tf.int64,
      )
      for f in feeds
    ]
    sizes = tf.stack([tf.size(v, out_type=tf.int64) for v in ids])
    values = tf.concat(ids, axis=0)
    limits = tf.repeat(
      tf.constant(
        [self.plan.tables[self.plan.input_table_map[f.index]].input_dim for f in feeds], tf.int64
      ),
      sizes,
    )
    # A sentinel keeps argmax defined when a worker holds no ids at all.
    bad = tf.concat([tf.logical_or(values < 0, values >= limits), [False]], 0)
    first = tf.argmax(tf.cast(bad, tf.int32), output_type=tf.int64)
    starts = tf.cumsum(sizes, exclusive=True)
    feed = tf.searchsorted(tf.cumsum(sizes), first[tf.newaxis], side="right", out_type=tf.int64)[0]
    feed = tf.minimum(feed, len(feeds) - 1)
    value = tf.gather(tf.concat([values, [0]], 0), first)
    index_of = tf.constant([f.index for f in feeds], tf.int64)
    none = tf.zeros([4], tf.int64)
    bad_id = tf.stack(
      [
        tf.constant(_BAD_ID, tf.int64),
        tf.gather(index_of, feed),
        first - tf.gather(starts, feed),
        value,
      ]
    )
    malformed_input = tf.stack(
      [
        tf.constant(_MALFORMED, tf.int64),
        tf.gather(index_of, first_malformed),
        tf.constant(-1, tf.int64),
        tf.constant(0, tf.int64),
      ]
    )
    return tf.where(
      tf.reduce_any(malformed), malformed_input, tf.where(tf.reduce_any(bad), bad_id, none)
    )

  def _check_workers(self, feeds):
    """The first collective of a forward pass: every worker learns every other's fingerprints,
    batch and input errors, and all raise the same InvalidArgumentError or none does. Returns
    the [world_size, fields] table, computed after the check passed."""
    sharded = [f for f in feeds if f.kind != "replicated"]
    if self.dp_input:
      batch = feeds[0].batch if feeds else tf.constant(0, tf.int64)
    else:
      batch = sharded[0].batch if sharded else tf.constant(-1, tf.int64)
    # Flat values the value gather sends: ragged ids, and the weights of weighted ones.
    n_values = sum(
      (
        tf.size(f.ids, out_type=tf.int64) * (2 if f.weights is not None else 1)
        for f in sharded
        if f.kind == "ragged"
      ),
      tf.constant(0, tf.int64),
    )
    mine = tf.concat(
      [
        tf.constant(
          [_CHECK_VERSION, self.world_size, self._plan_fingerprint, self._feed_fingerprint(feeds)],
          tf.int64,
        ),
        tf.stack([batch, n_values]),
        self._local_status(feeds),
      ],
      axis=0,
    )
    # Every input of one worker must have the same batch; a mismatch is this worker's error.
    for f in (feeds if self.dp_input else sharded)[1:]:
      unequal = tf.stack(
        [tf.constant(_UNEQUAL_BATCH, tf.int64), tf.constant(f.index, tf.int64), f.batch]
      )
      mine = tf.where(
        tf.logical_and(tf.not_equal(f.batch, batch), tf.equal(mine[_F_ERROR], _NO_ERROR)),
        tf.tensor_scatter_nd_update(mine, [[_F_ERROR], [_F_INPUT], [_F_VALUE]], unequal),
        mine,
      )
    table = tf.reshape(
      self.communicator.all_gather(mine, site=self._site("check")), [self.world_size, _CHECK_FIELDS]
    )
    failed, message = self._check_message(table)
    if tf.executing_eagerly():
      if bool(failed):
        text = message.numpy().decode()
        if bool(tf.reduce_any(tf.equal(table[:, _F_ERROR], _STRUCTURE))):
          raise ValueError(text)  # as the worker that found it raised
        raise tf.errors.InvalidArgumentError(None, None, text)
      return table
    check = tf.debugging.Assert(tf.logical_not(failed), [message])
    with tf.control_dependencies([check]):
      return tf.identity(table)

  def _check_message(self, table):
    """(failed, message) for the gathered check `table`; the message names the first problem."""
    name = f"DistributedEmbedding {self.name}"
    column = lambda field: table[:, field]  # pylint: disable=unnecessary-lambda-assignment
    differs = lambda field: tf.reduce_any(  # pylint: disable=unnecessary-lambda-assignment
      tf.not_equal(column(field), column(field)[0])
    )
    errors = column(_F_ERROR)
    structure = tf.equal(errors, _STRUCTURE)
    problems = [
      (
        differs(_F_VERSION) | differs(_F_WORLD),
        lambda: tf.strings.format(
          name + ": the workers run different versions of distributed_embeddings or "
          "different world sizes (per worker: {} {}).",
          (column(_F_VERSION), column(_F_WORLD)),
          summarize=-1,
        ),
      ),
      (
        differs(_F_PLAN),
        lambda: tf.strings.format(
          name + ": the workers disagree on the tables and their placement (plan fingerprint "
          "per worker: {}). Every worker must build DistributedEmbedding from the same "
          "embeddings and arguments and call its DistributedEmbedding layers in the same "
          "order.",
          column(_F_PLAN),
          summarize=-1,
        ),
      ),
      (
        tf.reduce_any(structure),
        lambda: tf.strings.format(
          name + ": worker {} could not use its inputs (input {}, -1: all of them) and "
          "raised an error that says why; every worker stops with it.",
          (
            tf.argmax(tf.cast(structure, tf.int32)),
            table[tf.argmax(tf.cast(structure, tf.int32)), _F_INPUT],
          ),
        ),
      ),
      (
        differs(_F_FEED),
        lambda: tf.strings.format(
          name + ": the workers were fed inputs of different structure (dense, ragged or "
          "sparse; the hotness of dense ids; input fingerprint per worker: {}). With "
          "dp_input=True every worker must pass every input in the same format.",
          column(_F_FEED),
          summarize=-1,
        ),
      ),
    ]
    if not self.dp_input:
      batches = tf.boolean_mask(column(_F_BATCH), column(_F_BATCH) >= 0)
      problems += [
        (
          tf.reduce_any(tf.not_equal(batches, tf.reduce_max(batches))),
          lambda: tf.strings.format(
            name + ": with dp_input=False every worker must be fed the same global batch; "
            "got {} rows (per worker, -1: no inputs).",
            column(_F_BATCH),
            summarize=-1,
          ),
        ),
        (
          tf.not_equal(tf.reduce_max(column(_F_BATCH)) % self.world_size, 0),
          lambda: tf.strings.format(
            name + ": the global batch ({}) is not divisible by the number of workers "
            f"({self.world_size}); it must divide evenly among {self.world_size} workers.",
            tf.reduce_max(column(_F_BATCH)),
          ),
        ),
      ]
    worker = tf.argmax(tf.cast(tf.not_equal(errors, _NO_ERROR), tf.int32), output_type=tf.int64)
    row = table[worker]
    tables = tf.constant(self.plan.input_table_map, tf.int64)
    rows = tf.constant([s.input_dim for s in self.plan.tables], tf.int64)
    table_of = tf.gather(tables, row[_F_INPUT] % len(self.plan.input_table_map))
    problems += [
      (
        tf.equal(row[_F_ERROR], _BAD_ID),
        lambda: tf.strings.format(
          "DistributedEmbedding: ids of input {} must be in [0, {}), the rows of table {}; "
          "got ids[{}] = {} on worker {}.",
          (
            row[_F_INPUT],
            tf.gather(rows, table_of),
            table_of,
            row[_F_POSITION],
            row[_F_VALUE],
            worker,
          ),
        ),
      ),
      (
        tf.equal(row[_F_ERROR], _MALFORMED),
        lambda: tf.strings.format(
          "DistributedEmbedding: input {} on worker {} is malformed: a RaggedTensor's "
          "row_splits must start at 0, never decrease and end at its number of values; a "
          "SparseTensor's indices must lie inside its dense_shape (at most 2**31 - 1 rows), in "
          "canonical row-major order (tf.sparse.reorder), each position once; weights must "
          "have the structure of their ids.",
          (row[_F_INPUT], worker),
        ),
      ),
      (
        tf.equal(row[_F_ERROR], _UNEQUAL_BATCH),
        lambda: tf.strings.format(
          "DistributedEmbedding: every input of a worker must have the same batch; on worker "
          "{} input {} has {} rows, input 0 has {}.",
          (worker, row[_F_INPUT], row[_F_VALUE], row[_F_BATCH]),
        ),
      ),
    ]
    failed = tf.reduce_any(tf.stack([p for p, _ in problems]))

    def describe():
      messages = tf.stack([tf.reshape(make(), []) for _, make in problems])
      first = tf.argmax(tf.cast(tf.stack([p for p, _ in problems]), tf.int32))
      return messages[first]

    if tf.executing_eagerly():
      return failed, describe() if bool(failed) else tf.constant("")
    return failed, tf.cond(failed, describe, lambda: tf.constant(""))

  def _call_workers(self, feeds):
    table = self._check_workers(feeds)
    if not tf.executing_eagerly():
      # Nothing may run on the inputs before the check has passed: a malformed input would fail
      # this worker's step on its own and leave the others waiting in a collective.
      feeds = [_after(f, table) for f in feeds]
    for f in feeds:
      if f.kind == "ragged" and f.lengths is None:  # sparse ids, well formed by now
        f.lengths = tf.math.bincount(
          tf.cast(f.original.indices[:, 0], tf.int32),
          minlength=tf.cast(f.batch, tf.int32),
          maxlength=tf.cast(f.batch, tf.int32),
          dtype=tf.int64,
        )
    outputs = [None] * len(self.plan.input_table_map)
    by_index = {f.index: f for f in feeds}
    if self.dp_input:
      batches = table[:, _F_BATCH]
    else:
      global_batch = tf.reduce_max(table[:, _F_BATCH])
      batches = tf.fill([self.world_size], global_batch // self.world_size)
    # Every worker's block of the global batch has the rows of the largest local batch.
    block = tf.maximum(tf.reduce_max(batches), 1)
    local_batch = batches[self.rank]
    # Rows of the padded global batch that hold a real bag: block w's first batches[w] rows.
    valid = tf.reshape(tf.sequence_mask(batches, block), [-1])

    # Replicated tables: local lookups of the local batch, ids already checked.
    for f in feeds:
      if f.kind == "replicated":
        ids, combiner = f.original, self.combiners[self.plan.input_table_map[f.index]]
        weights = f.original_weights
        squeeze = not isinstance(ids, (tf.RaggedTensor, tf.SparseTensor)) and ids.shape.rank == 1
        if squeeze:
          ids = ids[:, tf.newaxis]
          weights = None if weights is None else weights[:, tf.newaxis]
        if isinstance(ids, tf.SparseTensor) and combiner is not None:
          ids = id_formats.to_ragged(ids)
          if weights is not None:
            weights = tf.RaggedTensor.from_row_splits(
              weights.values, ids.row_splits, validate=False
            )
        out = self._lookup(
          self._replicated_vars[self.plan.input_table_map[f.index]], ids, combiner, weights=weights
        )
        outputs[f.index] = tf.squeeze(out, axis=1) if squeeze and combiner is None else out

    sharded = [f for f in feeds if f.kind != "replicated"]
    if self.dp_input:
      shapes = {f.index: (f.hotness, f.one_hot) for f in sharded if f.kind == "dense"}
    else:
      # Inputs without a combiner are one-hot with dp_input=False (checked when fed).
      shapes = {
        i: (1, True) for i, t in enumerate(self.plan.input_table_map) if self.combiners[t] is None
      }
    if self.dp_input:
      global_ids, global_weights = self._gather_ids(sharded, table, block)
    else:
      global_ids = {f.index: self._global_layout(f, block, f.ids) for f in sharded}
      global_weights = {
        f.index: self._global_layout(f, block, f.weights) for f in sharded if f.weights is not None
      }
    bags = {i: self._bags(by_index[i], ids, valid) for i, ids in global_ids.items()}
    weight_bags = {i: self._bags(by_index[i], w, valid) for i, w in global_weights.items()}

    after = self._row_slices(bags, shapes, outputs, block, local_batch, weight_bags)
    self._exchange(bags, shapes, outputs, block, local_batch, after, weight_bags)
    return outputs

  def _gather_ids(self, sharded, table, block):
    """({input: its ids of the global batch}, {input: its weights of the global batch}), laid out
    in blocks of `block` rows per worker: a dense [world * block, hotness] matrix, or (row
    lengths, flat values) for ragged ids. Weights travel in the ids' two collectives, as their
    bits (_weights_as_ids)."""
    comm = self.communicator
    dense = [f for f in sharded if f.kind == "dense"]
    ragged = [f for f in sharded if f.kind == "ragged"]
    dense_weighted = [f for f in dense if f.weights is not None]
    # The flat-value segments: every ragged input's ids, then the weights of the weighted ones.
    segments = [(f, f.ids, False) for f in ragged]
    segments += [(f, _weights_as_ids(f.weights), True) for f in ragged if f.weights is not None]
    columns = [f.ids for f in dense] + [_weights_as_ids(f.weights) for f in dense_weighted]
    columns += [f.lengths[:, tf.newaxis] for f, _, _ in segments]
    if not columns:
      return {}, {}
    local = comm_lib.pad_rows(tf.concat(columns, axis=1), block)
    row, index, length = _padded_rows(local, 1)
    gathered = comm.all_gather(row[0], size_class=index, site=self._site("ids"))
    matrix = tf.reshape(
      tf.reshape(gathered, [self.world_size, -1])[:, :length], [-1, local.shape[1]]
    )
    out, weights_out, column = {}, {}, 0
    for f in dense:
      out[f.index] = matrix[:, column : column + f.hotness]
      column += f.hotness
    for f in dense_weighted:
      weights_out[f.index] = _weights_from_ids(
        matrix[:, column : column + f.hotness], self.variable_dtype
      )
      column += f.hotness
    if segments:
      lengths = matrix[:, column:]  # [world * block, segments]; padding rows have length 0
      values_class, values_block = comm_lib.size_class(
        tf.maximum(tf.reduce_max(table[:, _F_VALUES]), 1)
      )
      values = comm.all_gather(
        comm_lib.pad_rows(tf.concat([v for _, v, _ in segments], 0), values_block),
        size_class=values_class,
        site=self._site("values"),
      )
      # Worker w's values of segment j start at w * values_block plus the counts of segments < j.
      counts = tf.reduce_sum(tf.reshape(lengths, [self.world_size, -1, len(segments)]), axis=1)
      starts = tf.range(self.world_size, dtype=tf.int64)[:, tf.newaxis] * values_block + tf.cumsum(
        counts, axis=1, exclusive=True
      )
      for j, (f, _, is_weights) in enumerate(segments):
        positions = tf.ragged.range(starts[:, j], starts[:, j] + counts[:, j]).flat_values
        if is_weights:
          weights_out[f.index] = (
            lengths[:, j],
            _weights_from_ids(tf.gather(values, positions), self.variable_dtype),
          )
        else:
          out[f.index] = (lengths[:, j], tf.gather(values, positions))
    return out, weights_out

  def _global_layout(self, feed, block, values):
    """dp_input=False: this worker's global batch of `feed` (its `values`: ids or weights, aligned
    with them), laid out like gathered ids."""
    rows = [self.world_size, -1]
    if feed.kind == "dense":
      per_worker = tf.reshape(values, [self.world_size, -1, feed.hotness])
      padded = tf.pad(per_worker, [[0, 0], [0, block - tf.shape(per_worker, tf.int64)[1]], [0, 0]])
      return tf.reshape(padded, [-1, feed.hotness])
    lengths = tf.reshape(feed.lengths, rows)
    lengths = tf.pad(lengths, [[0, 0], [0, block - tf.shape(lengths, tf.int64)[1]]])
    return tf.reshape(lengths, [-1]), values

  def _bags(self, feed, ids, valid):
    """The global batch of one input (its ids, or its weights laid out alike) as a RaggedTensor
    of bags, padding rows empty. Without a combiner every id is a bag of its own, so the lookup
    keeps one row per id."""
    combiner = self.combiners[self.plan.input_table_map[feed.index]]
    if isinstance(ids, tuple):
      lengths, values = ids
    elif combiner is None:
      unit = tf.reshape(tf.tile(valid[:, tf.newaxis], [1, feed.hotness]), [-1])
      lengths = tf.cast(unit, tf.int64)
      values = tf.boolean_mask(tf.reshape(ids, [-1]), unit)
    else:
      lengths = tf.cast(valid, tf.int64) * feed.hotness
      values = tf.reshape(tf.boolean_mask(ids, valid), [-1])
    return tf.RaggedTensor.from_row_lengths(values, lengths, validate=False)

  def _row_slices(self, bags, shapes, outputs, block, local_batch, weight_bags):
    """Row-sliced tables: partial (weighted) sums over this worker's rows of the global batch,
    summed across workers in one all-reduce; each worker keeps its local rows, divided for mean
    and sqrtn by the whole bag's divisor."""
    partials, parts = [], []
    for s, (var, _) in zip(self.local_shards, self._slots):
      if s.kind != "row_slice":
        continue
      for i in self._inputs_of_table[s.table]:
        combiner = self.combiners[s.table]
        ids = bags[i]
        # Ids of other workers' rows fall outside this slice and are skipped.
        partial = self._lookup(
          var,
          ids.with_values(ids.values - s.row_begin),
          "sum",
          bounds_check="skip",
          weights=weight_bags.get(i),
        )
        hotness = 1 if combiner is not None else shapes.get(i, (1, True))[0]
        partials.append(tf.reshape(partial, [self.world_size * block, hotness * s.width]))
        parts.append((i, ids))
    if not partials:
      return None
    partials_of_all = tf.concat(partials, axis=1)
    row, index, length = _padded_rows(partials_of_all, 1)
    summed = self.communicator.all_reduce(row[0], size_class=index, site=self._site("row_slices"))
    total = tf.reshape(summed[:length], tf.shape(partials_of_all))
    after = tf.reduce_sum(total[:0])  # exactly 0; see _exchange
    start = tf.cast(self.rank, tf.int64) * block
    offset = 0
    for (i, ids), partial in zip(parts, partials):
      width = partial.shape[1]
      mine = total[:, offset : offset + width][start : start + local_batch]
      offset += width
      combiner = self.combiners[self.plan.input_table_map[i]]
      if combiner in ("mean", "sqrtn"):
        w = weight_bags.get(i)
        if w is None:
          total_of_bag = tf.cast(ids.row_lengths(), mine.dtype)
        else:
          terms = w.values if combiner == "mean" else w.values * w.values
          total_of_bag = tf.reduce_sum(w.with_values(terms), axis=1)
        divisor = total_of_bag[start : start + local_batch]
        if combiner == "sqrtn":
          divisor = tf.sqrt(divisor)
        # An empty bag, or weights whose divisor is zero, give zeros (embedding_lookup's rule).
        nonzero = tf.not_equal(divisor, 0)[:, tf.newaxis]
        safe = tf.where(tf.equal(divisor, 0), tf.ones_like(divisor), divisor)[:, tf.newaxis]
        mine = tf.where(nonzero, mine / safe, tf.zeros_like(mine))
      outputs[i] = self._unflatten(i, [mine], shapes, local_batch)
    return after

  def _exchange(self, bags, shapes, outputs, block, local_batch, after=None, weight_bags=None):
    """Whole tables and column slices: look up the global batch, one all-to-all back.

    `after` (a zero computed from the row slices' all-reduce) is added to what this worker sends,
    so that on every worker the backward pass runs this all-to-all's gradient before the row
    slices' all-reduce's. Without the dependency each worker's tape orders the two independent
    collectives by its own op history, and two workers waiting in different ones hang.
    """
    layout = self.exchange_layout({i: h for i, (h, _) in shapes.items()})
    if layout.max_width == 0:
      return
    mine = layout.pieces[self.rank]
    entries = [(self.local_shards.index(p.shard), p.input_index) for p in mine]
    sends = [
      tf.reshape(out, [self.world_size * block, p.width])
      for p, out in zip(
        mine, self._local_lookups(entries, bags, unit_bags=True, weights_of=weight_bags)
      )
    ]
    dtype = self.variable_dtype
    send = tf.concat(sends, axis=1) if sends else tf.zeros([self.world_size * block, 0], dtype)
    send = tf.pad(send, [[0, 0], [0, layout.max_width - layout.block_widths[self.rank]]])
    if after is not None:
      send = send + tf.cast(after, send.dtype)
    rows, index, length = _padded_rows(send, self.world_size)
    received = self.communicator.all_to_all(rows, size_class=index, site=self._site("exchange"))
    received = tf.reshape(received[:, :length], [self.world_size, block, layout.max_width])
    assembled = {}
    for source, pieces in enumerate(layout.pieces):
      offset = 0
      for p in pieces:
        assembled.setdefault(p.input_index, []).append(
          (p.shard.col_begin, received[source, :, offset : offset + p.width][:local_batch])
        )
        offset += p.width
    for i, parts in assembled.items():
      parts.sort(key=lambda part: part[0])
      outputs[i] = self._unflatten(i, [p for _, p in parts], shapes, local_batch)

  def _unflatten(self, i, parts, shapes, local_batch):
    """Input `i`'s output from its column pieces [batch, hotness * piece width]: pooled or
    one-hot [batch, width], else [batch, hotness, width]."""
    hotness, one_hot = shapes.get(i, (1, True))
    if self.combiners[self.plan.input_table_map[i]] is None and not one_hot:
      parts = [tf.reshape(p, [local_batch, hotness, -1]) for p in parts]
    return tf.concat(parts, axis=-1)

  def exchange_layout(self, hotness=None):
    """The ExchangeLayout of the all-to-all: per worker, its (shard, input) pieces. `hotness`
    maps inputs without a combiner to their ids per row (default 1)."""
    hotness = hotness or {}
    pieces = []
    for worker in self.plan.shards:
      entries = []
      for s in worker:
        if s.kind == "row_slice":
          continue
        for i in self._inputs_of_table[s.table]:
          factor = 1 if self.combiners[s.table] is not None else hotness.get(i, 1)
          entries.append(Piece(s, i, s.width * factor))
      pieces.append(tuple(entries))
    return ExchangeLayout(tuple(pieces))

  def exchange_bytes_per_step(self, local_batch, bytes_per_element=4, hotness=None):
    """Activation bytes all workers together send per training step (forward and backward) in
    the all-to-all, and the minimum: each piece's rows sent once to each worker that needs them.
    Ours pads every worker's send block to the widest one, so the ratio is that padding. Ids,
    row-slice all-reduces and data-parallel gradients are not counted. `hotness`: ids per row of
    the inputs without a combiner (default 1)."""
    layout = self.exchange_layout(hotness)
    n = self.world_size
    padded = 2 * n * (n - 1) * local_batch * layout.max_width * bytes_per_element
    minimum = 2 * (n - 1) * local_batch * sum(layout.block_widths) * bytes_per_element
    return {"all_to_all": padded, "minimum": minimum}

  # ---- weights -------------------------------------------------------------------------------

  def get_weights(self, all_ranks=False):
    """The full global tables, in table order (collective: call on every worker). As in the
    reference API they are returned on rank 0 only, and [] elsewhere, unless `all_ranks`."""
    if not self.built:
      self.build()
    return self._global_tables({id(v): v for v in self.table_variables}, all_ranks)

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
      raise ValueError(
        f"set_weights: {self.name} is not built yet; call it on inputs or call build() first."
      )
    if not isinstance(chunk, (int, np.integer)) or isinstance(chunk, bool) or chunk < 1:
      raise ValueError(f"set_weights: 'chunk' must be a positive integer; got {chunk!r}.")
    weights = [
      np.load(w, mmap_mode="r") if isinstance(w, (str, os.PathLike)) else w for w in weights
    ]
    self._set_global_tables(
      {id(v): v for v in self.table_variables}, weights, "set_weights", int(chunk)
    )

  def get_optimizer_slots(self, optimizer, all_ranks=False):
    """{slot name: global tables} of `optimizer`'s per-row state for this layer's tables (e.g.
    Adagrad's accumulators), assembled like get_weights: on rank 0 only ({} elsewhere) unless
    `all_ranks`. Collective: call on all workers."""
    slots = {
      name: self._global_tables(by_var, all_ranks)
      for name, by_var in sorted(self.optimizer_slot_variables(optimizer).items())
    }
    return slots if all_ranks or self.rank == 0 else {}

  def set_optimizer_slots(self, optimizer, slots):
    """Loads what get_optimizer_slots returned, written by any worker count."""
    own = self.optimizer_slot_variables(optimizer)
    if set(own) != set(slots):
      raise ValueError(
        f"set_optimizer_slots: the optimizer has slots {sorted(own)}; got {sorted(slots)}."
      )
    for name, tables in slots.items():
      self._set_global_tables(own[name], tables, f"set_optimizer_slots[{name!r}]")

  def optimizer_slot_variables(self, optimizer):
    """{slot name: {id(table variable): optimizer variable}} of `optimizer`'s per-row state for
    `table_variables` (a slot has its variable's shape, or [rows, 1]: one value per row, as
    RowwiseAdagrad's accumulator); builds the optimizer if needed."""
    if not self.built:
      self.build()
    if not optimizer.built:
      optimizer.build(self.trainable_variables)
    slots = {}
    variables = self.table_variables
    for var in variables:
      prefix = var.path.replace("/", "_") + "_"
      per_row = (var.shape[0], 1)  # RowwiseAdagrad's accumulator
      for slot in optimizer.variables:
        if slot.name.startswith(prefix) and tuple(slot.shape) in (tuple(var.shape), per_row):
          slots.setdefault(slot.name[len(prefix) :], {})[id(var)] = slot
    missing = [name for name, by_var in slots.items() if len(by_var) != len(variables)]
    if missing:
      raise ValueError(f"optimizer slots {missing} do not cover every table of {self.name}.")
    return slots

  def _global_tables(self, by_var, all_ranks):
    """Global tables from `by_var` (id of one of this layer's variables -> a variable of the
    same shape: the weights themselves or an optimizer slot): every shard is broadcast by its
    owner, one at a time, and kept where wanted (everywhere or on rank 0)."""
    keep = all_ranks or self.rank == 0
    dtype = np.dtype(self.variable_dtype)
    per_row = self._per_row_state(by_var)
    # One read per variable (fused tables share one), without the whole-variable copy a read
    # makes in copy-on-read mode.
    values = {}

    def value_of(var):
      if id(var) not in values:
        values[id(var)] = embedding_lookup_ops.read_var_no_copy(by_var[id(var)])
      return values[id(var)]

    tables = []
    for t, spec in enumerate(self.plan.tables):
      if t in self._replicated_vars:
        if keep:
          tables.append(np.array(value_of(self._replicated_vars[t])))
        continue
      full = None
      if keep and per_row:
        full = np.zeros((spec.input_dim, 1), np.float64)
      elif keep:
        full = np.empty((spec.input_dim, spec.output_dim), dtype)
      for owner, shards in enumerate(self.plan.shards):
        for k, s in enumerate(shards):
          if s.table != t:
            continue
          piece = None
          if owner == self.rank:
            var, offset = self._slots[k]
            piece = value_of(var)[offset : offset + s.rows]

          def place(begin, rows, s=s, spec=spec):
            if not keep:
              return
            target = slice(s.row_begin + begin, s.row_begin + begin + rows.shape[0])
            if per_row:
              # A row's state is the mean over its columns: a column slice's counts for its share.
              full[target] += rows.numpy().astype(np.float64) * (s.width / spec.output_dim)
            else:
              full[target, s.col_begin : s.col_end] = rows.numpy()

          if self.world_size == 1:
            place(0, piece)
          else:
            # In pieces of at most 32 MiB: no worker holds a second whole copy of a shard.
            self.communicator.broadcast_rows(
              piece,
              owner,
              shape=[s.rows, 1 if per_row else s.width],
              dtype=self.variable_dtype,
              consume=place,
            )
      if keep:
        tables.append(full.astype(dtype) if per_row else full)
    distributed_training.release_freed_memory()
    return tables

  def _per_row_state(self, by_var):
    """Whether `by_var` maps the tables to per-row state ([rows, 1], one value per row), not to
    variables of their own shape. A width-1 table's state is both; either reading holds."""
    return any(
      tuple(by_var[id(v)].shape) != tuple(v.shape) and tuple(by_var[id(v)].shape)[1:] == (1,)
      for v in self.table_variables
    )

  def _set_global_tables(self, by_var, tables, what, chunk=_SET_WEIGHTS_CHUNK):
    if len(tables) != len(self.plan.tables):
      raise ValueError(f"{what}: expected {len(self.plan.tables)} tables; got {len(tables)}.")
    per_row = self._per_row_state(by_var)
    for t, (table, spec) in enumerate(zip(tables, self.plan.tables)):
      want = (spec.input_dim, 1 if per_row else spec.output_dim)
      if tuple(np.shape(table)) != want:
        raise ValueError(f"{what}: table {t} must be {want}; got {np.shape(table)}.")

    def assign_rows(var, first, source):
      """var[first:first + len(source)] = source, at most `chunk` elements at a time."""
      var = sparse_updates.backing_variable(var)
      rows_per_chunk = max(1, chunk // max(1, int(np.prod(source.shape[1:]))))
      for begin in range(0, source.shape[0], rows_per_chunk):
        part = np.asarray(source[begin : begin + rows_per_chunk], var.dtype.as_numpy_dtype)
        var[first + begin : first + begin + part.shape[0]].assign(part)

    tables = [np.asarray(table) for table in tables]  # a memory map stays one, unread
    for s, (var, offset) in zip(self.local_shards, self._slots):
      # Per-row state is the same for every column slice of a row.
      columns = slice(None) if per_row else slice(s.col_begin, s.col_end)
      assign_rows(by_var[id(var)], offset, tables[s.table][s.row_begin : s.row_end, columns])
    for t, var in self._replicated_vars.items():
      assign_rows(by_var[id(var)], 0, tables[t])
    distributed_training.release_freed_memory()
