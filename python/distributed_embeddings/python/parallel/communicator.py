"""Collective communication among workers on TensorFlow's own collective ops (no Horovod).

A `Communicator` is one worker's handle on a group of `world_size` workers: all-reduce,
all-gather, broadcast and all-to-all, with gradients, and variable-size all-gather and
all-to-all. Every worker must issue the same collectives in the same order; instance keys come
from a per-communicator counter, so identical programs agree on them. Workers are one of:
  * the only worker (world_size 1): every collective is the identity, nothing is sent;
  * threads of one process, each on its own logical device (`run_in_threads`, or the replica
    threads of a MirroredStrategy), the unit-test harness;
  * processes connected over gRPC (`init_from_env`, set up by `distributed_embeddings.launch`).

Instance keys stay bounded, and one key never sees two shapes. TensorFlow caches a collective's
parameters (shape included) per instance key for the life of the process (~3 KB each), and a
key met again with another shape fails ("Shape mismatch in the collective instance") and aborts
every collective of the process. Inside a tf.function every call site takes its keys when it is
traced, so workers must retrace alike. Eagerly, one key serves every call with the same
signature (kind, shape, dtype), which is safe because an eager collective finishes before the
next one starts. A dimension that varies between calls (a batch, a number of ids) is padded to a
size class (`size_class`: exact up to 16, then eight steps per power of two, so at most 12.5%
padding) and the call site's key is picked by the class at run time.

Failures end in bounded time. Every collective has a timeout (`collective_timeout` seconds,
default 1800, `DE_COLLECTIVE_TIMEOUT_SECONDS`; 0 waits forever), and `init_from_env` starts a
monitor that probes the other workers every few seconds and, when one is gone, aborts this
process's collectives with an error naming it. After any collective error TensorFlow keeps every
later collective of the process failing ("Restart your program"): restart all workers.

Each communicator carries an ordering token (a resource variable on its device): chaining its
collectives through it keeps them in program order inside a tf.function, which they need to avoid
cross-device deadlocks.
"""

import itertools
import os
import pickle
import threading
import weakref

import numpy as np
import tensorflow as tf
from tensorflow.python.ops import collective_ops
from tensorflow.python.ops import resource_variable_ops

_GROUP_KEYS = itertools.count(1000)  # Clear of the keys tf.distribute strategies use.
_KEYS_PER_GROUP = 1_000_000  # Instance keys are int32: room for ~1100 groups from 1000 on.
_GROUP_KEYS_LOCK = threading.Lock()

# Size classes: n itself up to _EXACT_SIZES, then _STEPS_PER_OCTAVE sizes per power of two, up to
# 2**_LARGEST_OCTAVE elements.
_EXACT_SIZES = 16
_STEPS_PER_OCTAVE = 8
_LARGEST_OCTAVE = 40
SIZE_CLASSES = _EXACT_SIZES + 1 + (_LARGEST_OCTAVE - 4) * _STEPS_PER_OCTAVE

# Eager broadcasts of whole variables and tables move at most this much at a time.
BROADCAST_CHUNK_BYTES = 4 << 20

_TIMEOUT_VARIABLE = "DE_COLLECTIVE_TIMEOUT_SECONDS"
_DEFAULT_TIMEOUT_SECONDS = 1800.0
_PEER_CHECK_VARIABLE = "DE_PEER_CHECK_SECONDS"
_DEFAULT_PEER_CHECK_SECONDS = 5.0


def size_class(n):
  """(class, padded size) of int64 `n` >= 0, as tensors: the size a dimension of n is padded to,
  and the index among SIZE_CLASSES that picks the collective's key. Sizes 1 to 16 are exact (0
  pads to 1); above, 2**k < n <= 2**(k + 1) is rounded up to a multiple of 2**(k - 3)."""
  # No assertion here: an assert is a stateful op, and inside a MirroredStrategy step
  # automatic control dependencies would chain it behind another replica's collectives. A size
  # above 2**40 could not be allocated anyway; its class is clamped to the last one.
  # At least 1: a collective on an empty tensor can crash TensorFlow's runtime.
  n = tf.maximum(tf.cast(n, tf.int64), 1)
  # k: the exponent with 2**k < n <= 2**(k + 1), for n > 1.
  k = tf.reduce_sum(
    tf.cast(
      tf.bitwise.right_shift(tf.maximum(n - 1, 1), tf.range(1, 63, dtype=tf.int64)) > 0, tf.int64
    )
  )
  step = tf.bitwise.left_shift(tf.constant(1, tf.int64), tf.maximum(k - 3, 0))
  low = tf.bitwise.left_shift(tf.constant(1, tf.int64), k)
  j = (n - low + step - 1) // step  # 1..8
  large = n > _EXACT_SIZES
  padded = tf.where(large, low + j * step, n)
  index = tf.where(large, _EXACT_SIZES + (k - 4) * _STEPS_PER_OCTAVE + j, n)
  return tf.cast(tf.minimum(index, SIZE_CLASSES - 1), tf.int32), padded


def padded_size(n):
  """The size `size_class` pads a dimension of `n` (a Python int) to."""
  n = max(n, 1)
  if n <= _EXACT_SIZES:
    return n
  k = (n - 1).bit_length() - 1
  step = 1 << (k - 3)
  return (1 << k) + -(-(n - (1 << k)) // step) * step


def default_timeout():
  """Seconds a collective may wait for its peers: DE_COLLECTIVE_TIMEOUT_SECONDS, else 1800."""
  value = os.environ.get(_TIMEOUT_VARIABLE, "")
  if not value:
    return _DEFAULT_TIMEOUT_SECONDS
  try:
    seconds = float(value)
  except ValueError:
    seconds = -1.0
  if not seconds >= 0:
    raise ValueError(
      f"Environment variable {_TIMEOUT_VARIABLE} must be a number of seconds >= 0 "
      f"(0: no timeout); got {value!r}."
    )
  return seconds


def new_group_key():
  """A group key for a new group; every worker must create its groups in the same order."""
  with _GROUP_KEYS_LOCK:
    return next(_GROUP_KEYS)


class Site:
  """A named collective call site of an `owner` object (a layer, a variable): its instance keys
  are reserved the first time the site is used and stay the same however often, and on whichever
  worker, a function using it is retraced. Make one with `Communicator.site`."""

  def __init__(self, owner, name):
    self.owner = owner
    self.name = name

  def child(self, suffix):
    return Site(self.owner, f"{self.name}/{suffix}")


class _OwnerKeys:
  """The instance keys of one owner: {site name: first key} of the collectives seen, and, if the
  owner reserved keys, {reserved site: [next free key, end]}."""

  def __init__(self, owner, blocks):
    self.owner = owner
    self.blocks = blocks
    self.sites = {}


class Communicator:
  """Worker `rank` of `world_size`, communicating within `group_key` on `device`.

  `timeout` is the seconds any collective may wait for the other workers before it fails with
  DeadlineExceededError (None: `default_timeout()`; 0: no limit).

  Instance keys come from three sources. A collective given a `site` uses the keys of that site
  (see `site`): the same on every worker whatever each one traced before, which the layers and
  the training API rely on. Without a site, a traced collective takes the next keys when it is
  traced (so every worker must trace alike), and an eager one the key of its signature.
  """

  def __init__(
    self, rank, world_size, group_key=None, device=None, communication_hint="auto", timeout=None
  ):
    if not 0 <= rank < world_size:
      raise ValueError(f"'rank' must be in [0, {world_size}); got {rank}.")
    if timeout is not None and (
      isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout >= 0
    ):
      raise ValueError(f"'timeout' must be None or a number of seconds >= 0; got {timeout!r}.")
    self.rank = rank
    self.world_size = world_size
    self.group_key = group_key if group_key is not None else 1000
    self.device = device
    self.communication_hint = communication_hint
    self.timeout = float(default_timeout() if timeout is None else timeout)
    # TensorFlow caches a collective's parameters per instance key for the life of the process,
    # whatever the group: each group gets its own key range.
    self._next_key = self.group_key * _KEYS_PER_GROUP
    self._eager_keys = {}
    self._site_keys = {}  # id(owner) -> _OwnerKeys
    self._graph_uses = weakref.WeakKeyDictionary()  # graph -> {(id(owner), name): uses}
    self._lock = threading.Lock()
    self._token = None
    if world_size > 1:
      with tf.init_scope(), tf.device(device):
        self._token = resource_variable_ops.ResourceVariable(
          0.0, trainable=False, name=f"collective_order_{rank}"
        )

  def site(self, owner, name):
    """The call site `name` of `owner` for one use in the function being traced (or eagerly).

    A function may use one site several times (a layer called twice): each use within one
    traced graph gets its own keys, numbered in program order, so no key serves two
    collectives of one step. Every worker must create its sites' first uses in the same order,
    which identical programs do.
    """
    index = 0
    if not tf.executing_eagerly():
      graph = tf.compat.v1.get_default_graph()
      with self._lock:
        uses = self._graph_uses.setdefault(graph, {})
        index = uses.get((id(owner), name), 0)
        uses[(id(owner), name)] = index + 1
    return Site(owner, f"{name}#{index}")

  def _reserve_keys(self, count):
    with self._lock:
      key = self._next_key
      if key + count > (self.group_key + 1) * _KEYS_PER_GROUP:
        raise RuntimeError(
          f"Communicator (group {self.group_key}) ran out of collective "
          f"instance keys after {_KEYS_PER_GROUP}; trace fewer functions."
        )
      self._next_key += count
      return key

  def reserve_keys_for(self, owner, sites):
    """Reserves instance keys for the call sites of `owner` now (e.g. when a layer is built):
    `sites` maps each site name (as given to `site`, with its '#use' suffix) to the number of
    keys its collectives need. Every worker creates its layers in the same order, so the keys
    agree whatever each worker traced or failed at since. Other sites (of other owners, or
    further uses) take their keys when first used."""
    first = self._reserve_keys(sum(sites.values()))
    blocks, offset = {}, first
    for name in sorted(sites):
      blocks[name] = [offset, offset + sites[name]]
      offset += sites[name]
    with self._lock:
      # Forget owners that are gone (their keys are not reused: workers may collect their
      # objects in different orders).
      for key in [k for k, e in self._site_keys.items() if e.owner() is None]:
        del self._site_keys[key]
      self._site_keys[id(owner)] = _OwnerKeys(weakref.ref(owner), blocks)

  def _keys_of(self, site, count):
    """`count` keys of `site`: the same ones every time. Within a reserved site, the keys of its
    collectives (a forward one, then its gradient's) follow in the order of their first use,
    which one call site's program fixes."""
    root = site.name.split("/")[0]
    with self._lock:
      entry = self._site_keys.get(id(site.owner))
      if entry is None or entry.owner() is not site.owner:
        entry = _OwnerKeys(weakref.ref(site.owner), None)
        self._site_keys[id(site.owner)] = entry
      known = entry.sites.get(site.name)
      if known is not None:
        return known
      block = entry.blocks.get(root) if entry.blocks is not None else None
      if block is not None:
        if block[0] + count > block[1]:
          raise RuntimeError(
            f"{type(site.owner).__name__} has no collective instance keys left "
            f"for '{site.name}': more call sites, or more calls in one traced "
            "function, than it reserved."
          )
        known, block[0] = block[0], block[0] + count
        entry.sites[site.name] = known
        return known
    known = self._reserve_keys(count)
    with self._lock:
      entry.sites[site.name] = known
    return known

  def _instance_key(self, kind, tensor, size_class=None, site=None):
    """The instance key of a collective on `tensor`; with `size_class`, a block of SIZE_CLASSES
    keys of which the class (a tensor) picks one at run time."""
    count = 1 if size_class is None else SIZE_CLASSES
    if site is not None:
      base = self._keys_of(site.child(kind), count)
    elif tf.executing_eagerly():
      signature = (kind, tuple(tensor.shape), tensor.dtype)
      if signature not in self._eager_keys:
        self._eager_keys[signature] = self._reserve_keys(1)
      return self._eager_keys[signature]
    else:
      base = self._reserve_keys(count)
    return base if size_class is None else base + tf.cast(size_class, tf.int32)

  def _common(self, kind, tensor, size_class=None, site=None):
    return dict(
      group_size=self.world_size,
      group_key=self.group_key,
      instance_key=self._instance_key(kind, tensor, size_class, site),
      communication_hint=self.communication_hint,
      timeout=self.timeout,
      ordering_token=self._token.handle,
    )

  def all_reduce(self, tensor, op="sum", size_class=None, site=None):
    """Sum (or mean) of `tensor` over workers; its gradient is the all-reduce of the gradient.

    A tensor whose shape varies between calls of one traced function must come padded to a
    size class, given as `size_class` (see `size_class`); likewise for the other collectives.
    `site` (see `site`) picks the instance keys.
    """
    if self.world_size == 1:
      return tf.identity(tensor)
    merge = {"sum": "Add", "mean": "Add"}[op]

    @tf.custom_gradient
    def reduce(x):
      with tf.device(self.device):
        y = collective_ops.all_reduce_v2(
          x, merge_op=merge, final_op="Id", **self._common("all_reduce", x, size_class, site)
        )
        if op == "mean":
          y = y / self.world_size

      def grad(dy):
        return self.all_reduce(dy, op, size_class, site and site.child("grad"))

      return y, grad

    return reduce(tensor)

  def all_gather(self, tensor, size_class=None, site=None):
    """Concatenation along axis 0 of every worker's `tensor` (same shape everywhere), in rank
    order. Its gradient is each worker's slice of the summed gradient."""
    if self.world_size == 1:
      return tf.identity(tensor)

    def gather(x):
      with tf.device(self.device):
        return collective_ops.all_gather_v2(x, **self._common("all_gather", x, size_class, site))

    if not tensor.dtype.is_floating:
      return gather(tensor)

    @tf.custom_gradient
    def differentiable(x):
      def grad(dy):
        total = self.all_reduce(dy, size_class=size_class, site=site and site.child("grad"))
        rows = tf.shape(x)[0]
        return total[self.rank * rows : (self.rank + 1) * rows]

      return gather(x), grad

    return differentiable(tensor)

  def all_gather_v(self, tensors, site=None):
    """Concatenation along axis 0 of every worker's tensors, whose first dimension may differ
    between workers (the other dimensions must agree), in rank order. `tensors` is one tensor or
    a list of tensors sharing their first dimension (e.g. the indices and values of a sparse
    gradient), exchanged with one size exchange. Not differentiable.

    The sizes are all-gathered first; each worker pads to the size class of the largest,
    exchanges, and drops the padding.
    """
    single = not isinstance(tensors, (list, tuple))
    tensors = [tf.convert_to_tensor(t) for t in ([tensors] if single else tensors)]
    if self.world_size == 1:
      out = [tf.identity(t) for t in tensors]
      return out[0] if single else out
    with tf.device(self.device):
      sizes = self.all_gather(
        tf.shape(tensors[0], out_type=tf.int64)[:1], site=site and site.child("sizes")
      )
      index, padded = size_class(tf.reduce_max(sizes))
      valid = tf.reshape(tf.sequence_mask(sizes, padded), [-1])
      out = []
      for k, t in enumerate(tensors):
        gathered = self.all_gather(
          pad_rows(t, padded), size_class=index, site=site and site.child(f"part{k}")
        )
        out.append(tf.boolean_mask(tf.stop_gradient(gathered), valid))
    return out[0] if single else out

  def all_to_all(self, tensor, size_class=None, site=None):
    """Exchanges equal chunks: `tensor` is [world_size, ...]; row w goes to worker w, and row w
    of the result came from worker w. All-to-all is its own adjoint, which gives the gradient."""
    if self.world_size == 1:
      return tf.identity(tensor)

    def exchange(x, where):
      with tf.device(self.device):
        flat = tf.reshape(x, [self.world_size, -1])
        return tf.reshape(
          collective_ops.all_to_all_v2(flat, **self._common("all_to_all", flat, size_class, where)),
          tf.shape(x),
        )

    if not tensor.dtype.is_floating:
      return exchange(tensor, site)

    @tf.custom_gradient
    def differentiable(x):
      def grad(dy):
        return exchange(dy, site and site.child("grad"))

      return exchange(x, site), grad

    return differentiable(tensor)

  def all_to_all_v(self, chunks, site=None):
    """Variable-size all-to-all: `chunks` is a list of world_size tensors, chunks[w] going to
    worker w; their first dimensions may differ (the rest must agree everywhere). Returns the
    list of what each worker sent here, in rank order. Differentiable for floating dtypes: the
    gradient runs the same exchange backwards.

    Block sizes are exchanged first; every block is padded to the size class of the largest
    block anywhere, which picks the padded exchange's instance key.
    """
    chunks = [tf.convert_to_tensor(c) for c in chunks]
    if len(chunks) != self.world_size:
      raise ValueError(f"all_to_all_v: expected {self.world_size} chunks; got {len(chunks)}.")
    if self.world_size == 1:
      return [tf.identity(chunks[0])]
    dtype = chunks[0].dtype
    with tf.device(self.device):
      send_sizes = tf.stack([tf.shape(c, out_type=tf.int64)[0] for c in chunks])
      # recv_sizes[w]: rows worker w sends here.
      recv_sizes = tf.reshape(
        self.all_to_all(
          tf.reshape(send_sizes, [self.world_size, 1]), site=site and site.child("sizes")
        ),
        [-1],
      )
      index, padded = size_class(
        self.all_reduce_max(tf.reduce_max(send_sizes), site=site and site.child("largest"))
      )

    def exchange(blocks, sizes_in, where):
      padded_blocks = tf.stack([pad_rows(b, padded) for b in blocks])
      received = self.all_to_all(padded_blocks, size_class=index, site=where)
      return [received[w, : sizes_in[w]] for w in range(self.world_size)]

    if not dtype.is_floating:
      return exchange(chunks, recv_sizes, site and site.child("blocks"))

    @tf.custom_gradient
    def differentiable(*blocks):
      def grad(*dys):
        return exchange(
          [tf.convert_to_tensor(dy) for dy in dys], send_sizes, site and site.child("blocks_grad")
        )

      return exchange(list(blocks), recv_sizes, site and site.child("blocks")), grad

    with tf.device(self.device):
      return list(differentiable(*chunks))

  def all_reduce_max(self, tensor, site=None):
    """Element-wise maximum of `tensor` over workers (not differentiable)."""
    if self.world_size == 1:
      return tf.identity(tensor)
    with tf.device(self.device):
      return collective_ops.all_reduce_v2(
        tensor, merge_op="Max", final_op="Id", **self._common("all_reduce_max", tensor, site=site)
      )

  def broadcast(self, tensor, root=0, shape=None, dtype=None):
    """`tensor` of worker `root`, on every worker.

    Eagerly the other workers may pass None with the `shape` and `dtype` to receive: a real
    broadcast, so a receiver holds only the result. In a tf.function every worker passes a tensor
    of the root's shape (an all-reduce of zeros elsewhere).
    """
    if self.world_size == 1:
      return tf.identity(tensor)
    if tf.executing_eagerly():
      if self.rank == root:
        tensor = tf.convert_to_tensor(tensor)
        shape, dtype = tensor.shape, tensor.dtype
      else:
        shape = tensor.shape if tensor is not None else tf.TensorShape(shape)
        dtype = tf.as_dtype(tensor.dtype if tensor is not None else dtype)
      key = self._instance_key(("broadcast", root), tf.TensorSpec(shape, dtype))
      common = dict(
        group_size=self.world_size,
        group_key=self.group_key,
        instance_key=key,
        communication_hint=self.communication_hint,
        timeout=self.timeout,
      )
      with tf.device(self.device):
        if self.rank == root:
          return collective_ops.broadcast_send_v2(tensor, **common)
        return collective_ops.broadcast_recv_v2(
          tf.constant(shape.as_list(), tf.int32), dtype, **common
        )
    contribution = tensor if self.rank == root else tf.zeros_like(tensor)
    if tensor.dtype.is_integer or tensor.dtype == tf.bool:
      return tf.cast(self.all_reduce(tf.cast(contribution, tf.int64)), tensor.dtype)
    return self.all_reduce(contribution)

  def broadcast_variable(self, variable, root=0, value=None):
    """Eagerly gives `variable` (a tf.Variable) worker `root`'s value, sent from `value` (default:
    the root's read of the variable) in pieces of at most BROADCAST_CHUNK_BYTES.

    A receiver collects the pieces in host memory and assigns them in one piece, which
    TensorFlow copies into the variable's own buffer: TensorFlow's CPU allocator, which keeps
    whatever it once held, never grows by a table's size, and the variable stays out of
    copy-on-read mode (a sliced assignment would put it there, after which every read copies the
    whole table)."""
    if self.world_size == 1:
      return
    if self.rank == root:
      self.broadcast_rows(
        tf.convert_to_tensor(variable) if value is None else value,
        root,
        consume=lambda begin, piece: None,
      )
      return
    buffer = np.empty(variable.shape.as_list(), variable.dtype.as_numpy_dtype)

    def collect(begin, piece):
      if buffer.ndim:
        buffer[begin : begin + piece.shape[0]] = piece.numpy()
      else:
        buffer[...] = piece.numpy()

    self.broadcast_rows(None, root, shape=variable.shape, dtype=variable.dtype, consume=collect)
    variable.assign(buffer)

  def broadcast_rows(self, tensor, root=0, shape=None, dtype=None, consume=None):
    """Eagerly broadcasts `tensor` (None off the root, with `shape` and `dtype`) in pieces of at
    most BROADCAST_CHUNK_BYTES along axis 0, and hands each piece to `consume(begin, piece)`
    on every worker. No worker ever holds a second whole copy of a large tensor, and TensorFlow's
    CPU allocator, which keeps what it once held, never grows by a table's size."""
    if self.rank == root:
      tensor = tf.convert_to_tensor(tensor)
      shape, dtype = tensor.shape, tensor.dtype
    shape, dtype = tf.TensorShape(shape), tf.as_dtype(dtype)
    rows = shape[0] if shape.rank else 1
    row_bytes = max(1, shape[1:].num_elements() * dtype.size) if shape.rank else dtype.size
    step = max(1, BROADCAST_CHUNK_BYTES // row_bytes)
    if not shape.rank:
      consume(0, self.broadcast(tensor, root, shape=shape, dtype=dtype))
      return
    for begin in range(0, rows, step):
      end = min(rows, begin + step)
      piece = tensor[begin:end] if self.rank == root else None
      consume(
        begin, self.broadcast(piece, root, shape=[end - begin] + shape[1:].as_list(), dtype=dtype)
      )

  def broadcast_object(self, obj, root=0):
    """Worker `root`'s `obj` (anything picklable: a seed, a config), on every worker; eager
    only. The reference API's `hvd.broadcast_object`. Pickles come from the job's own workers."""
    if self.world_size == 1:
      return obj
    if not tf.executing_eagerly():
      raise RuntimeError("broadcast_object runs eagerly only; call it outside tf.function.")
    payload = None
    if self.rank == root:
      data = pickle.dumps(obj)
      payload = np.frombuffer(data + bytes(-len(data) % 8), np.int64)  # collectives move no bytes
    size = self.broadcast(tf.constant([0 if payload is None else payload.size], tf.int64), root)
    received = self.broadcast(
      None if payload is None else tf.constant(payload), root, shape=[int(size[0])], dtype=tf.int64
    ).numpy()
    return obj if self.rank == root else pickle.loads(received.tobytes())


def pad_rows(tensor, rows):
  """`tensor` with zero rows appended along axis 0 up to `rows`."""
  extra = tf.cast(rows, tf.int64) - tf.shape(tensor, out_type=tf.int64)[0]
  paddings = tf.concat([[[0, extra]], tf.zeros([tf.rank(tensor) - 1, 2], tf.int64)], axis=0)
  padded = tf.pad(tensor, paddings)
  if tensor.shape.rank is not None:
    padded.set_shape(tf.TensorShape([None]).concatenate(tensor.shape[1:]))
  return padded


def run_in_threads(world_size, fn, timeout=None):
  """Runs fn(communicator) for `world_size` workers, each a thread on logical CPU device `rank`.

  The process must have at least `world_size` logical CPU devices (see
  `configure_logical_devices`). Returns the list of results in rank order; re-raises the first
  worker error.
  """
  group_key = new_group_key()
  results, errors = [None] * world_size, []

  def worker(rank):
    device = f"/device:CPU:{rank}"
    try:
      with tf.device(device):
        results[rank] = fn(Communicator(rank, world_size, group_key, device, timeout=timeout))
    except Exception as error:  # pylint: disable=broad-except
      errors.append(error)

  threads = [threading.Thread(target=worker, args=(rank,)) for rank in range(world_size)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  if errors:
    raise errors[0]
  return results


def configure_logical_devices(count):
  """Splits the CPU into `count` logical devices; call before TensorFlow initializes devices."""
  cpus = tf.config.list_physical_devices("CPU")
  tf.config.set_logical_device_configuration(
    cpus[0], [tf.config.LogicalDeviceConfiguration() for _ in range(count)]
  )


_DEFAULT = None


def default_communicator():
  """The communicator set by `init_from_env` (or `set_default_communicator`), else one worker."""
  return _DEFAULT if _DEFAULT is not None else Communicator(0, 1)


def set_default_communicator(communicator):
  global _DEFAULT  # pylint: disable=global-statement
  _DEFAULT = communicator


# Where a process learns its index among the workers on its own host, most specific first: our
# launcher, then torchrun's and Open MPI's conventions.
_LOCAL_RANK_VARIABLES = ("DE_LOCAL_RANK", "LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK")


def local_rank(rank, environ=None):
  """This worker's index among the workers on its host.

  The first of _LOCAL_RANK_VARIABLES that is set, else the global `rank` (right when every worker
  runs on one host).
  """
  environ = os.environ if environ is None else environ
  for name in _LOCAL_RANK_VARIABLES:
    value = environ.get(name)
    if value is None or value == "":
      continue
    try:
      index = int(value)
    except ValueError:
      raise ValueError(
        f"Environment variable {name} must be a worker index; got {value!r}"
      ) from None
    if index < 0:
      raise ValueError(f"Environment variable {name} must be a worker index; got {value!r}")
    return index
  return rank


def worker_placement(rank, num_gpus, environ=None):
  """(GPU index to use or None, local device name, communication hint) for worker `rank`.

  With GPUs each worker takes one of its host's GPUs by local rank (round robin when there are
  more workers than GPUs) and exchanges over NCCL; without, it stays on its CPU and TensorFlow
  picks the collective implementation (ring over gRPC).
  """
  if num_gpus <= 0:
    return None, "CPU:0", "auto"
  return local_rank(rank, environ) % num_gpus, "GPU:0", "nccl"


def _pin_to_gpu(gpu_index):
  """Makes GPU `gpu_index` this process's only visible GPU (GPU:0); returns the device to use.

  Once TensorFlow has initialized its devices the choice is fixed; then the worker addresses its
  GPU by index instead, and variables created without a device scope land on GPU:0, so say so.
  """
  gpus = tf.config.list_physical_devices("GPU")
  try:
    tf.config.set_visible_devices(gpus[gpu_index], "GPU")
    return "GPU:0"
  except RuntimeError:
    if gpu_index != 0:
      import warnings  # pylint: disable=import-outside-toplevel

      warnings.warn(
        f"init_from_env: TensorFlow had already initialized its devices, so this "
        f"worker could not be limited to GPU {gpu_index}; call init_from_env before "
        f"any other TensorFlow work.",
        RuntimeWarning,
        stacklevel=3,
      )
    return f"GPU:{gpu_index}"


class PeerMonitor:
  """Probes the other workers every `interval` seconds from a daemon thread; when one is gone
  (its process ended or restarted), aborts this process's collectives with an error that names
  it, so that no collective waits for a dead peer until its timeout.

  Start it once every peer is known to be up (`init_from_env` starts it after a first collective
  of all workers): probing a peer that is still starting would leave TensorFlow's connection to
  it failing. A refused connection or a restarted peer counts as gone at once, one that does not
  answer as gone after three probes in a row.
  """

  def __init__(self, rank, world_size, interval, task=lambda r: f"/job:worker/replica:0/task:{r}"):
    self.rank = rank
    self.peers = [r for r in range(world_size) if r != rank]
    self.interval = interval
    self._task = task
    self._stopped = threading.Event()
    self.gone = None  # (rank, error) once a peer is found gone
    self._thread = threading.Thread(target=self._run, name="de-peer-monitor", daemon=True)

  def start(self):
    self._thread.start()
    return self

  def stop(self):
    self._stopped.set()

  def _run(self):
    from tensorflow.python.eager import context  # pylint: disable=import-outside-toplevel
    from tensorflow.python.framework import errors  # pylint: disable=import-outside-toplevel

    misses = {r: 0 for r in self.peers}
    timeout_ms = max(1, int(self.interval * 1000))
    while not self._stopped.wait(self.interval):
      for peer in self.peers:
        try:
          context.context().check_collective_ops_peer_health(self._task(peer), timeout_ms)
          misses[peer] = 0
          continue
        except errors.OpError as error:
          cause = error
        except Exception:  # pylint: disable=broad-except
          continue  # e.g. collectives not enabled yet; probe again later
        if isinstance(cause, errors.DeadlineExceededError):
          misses[peer] += 1
          if misses[peer] < 3:
            continue
        elif not isinstance(cause, (errors.UnavailableError, errors.FailedPreconditionError)):
          continue
        if self._stopped.is_set():
          return
        detail = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
        self.gone = (peer, cause)
        context.context().abort_collective_ops(
          errors.UNAVAILABLE,
          f"distributed_embeddings: worker {peer} ({self._task(peer)}) is gone ({detail}). "
          f"Worker {self.rank} has aborted its collectives, and TensorFlow fails every later "
          "one in this process: restart all workers (BackupAndRestore resumes from the last "
          "epoch).",
        )
        return


_MONITOR = None


def init_from_env(collective_timeout=None, peer_check_seconds=None):
  """Joins the workers named by TF_CONFIG (as `distributed_embeddings.launch` sets it).

  Each process calls this once, before creating variables. It connects the processes over gRPC
  for TensorFlow's collective ops, makes the resulting communicator the default one, and returns
  it. Without TF_CONFIG the process is the only worker. On a host with GPUs each worker keeps one
  of them (by local rank: `DE_LOCAL_RANK`, which the launcher sets, `LOCAL_RANK` or
  `OMPI_COMM_WORLD_LOCAL_RANK`, else its task index), and collectives run on it over NCCL.

  Args:
    collective_timeout: seconds a collective may wait for the others before it fails (None:
      `DE_COLLECTIVE_TIMEOUT_SECONDS`, else 1800; 0: no limit).
    peer_check_seconds: how often the other workers are probed; a worker found gone aborts this
      process's collectives with an error naming it (None: `DE_PEER_CHECK_SECONDS`, else 5;
      0: no probes).
  """
  import json  # pylint: disable=import-outside-toplevel
  from tensorflow.core.protobuf import config_pb2  # pylint: disable=import-outside-toplevel
  from tensorflow.core.protobuf import tensorflow_server_pb2  # pylint: disable=import-outside-toplevel
  from tensorflow.python.eager import context  # pylint: disable=import-outside-toplevel

  global _MONITOR  # pylint: disable=global-statement

  if peer_check_seconds is None:
    value = os.environ.get(_PEER_CHECK_VARIABLE, "")
    try:
      peer_check_seconds = float(value) if value else _DEFAULT_PEER_CHECK_SECONDS
    except ValueError:
      raise ValueError(
        f"Environment variable {_PEER_CHECK_VARIABLE} must be a number of seconds; got {value!r}."
      ) from None
  if isinstance(peer_check_seconds, bool) or not peer_check_seconds >= 0:
    raise ValueError(
      f"'peer_check_seconds' must be a number of seconds >= 0; got {peer_check_seconds!r}."
    )
  config = json.loads(os.environ.get("TF_CONFIG", "{}"))
  workers = config.get("cluster", {}).get("worker", [])
  if len(workers) <= 1:
    communicator = Communicator(0, 1, timeout=collective_timeout)
  else:
    rank = int(config["task"]["index"])
    gpu_index, device, hint = worker_placement(rank, len(tf.config.list_physical_devices("GPU")))
    if gpu_index is not None:
      device = _pin_to_gpu(gpu_index)
    leader = "/job:worker/replica:0/task:0"
    cluster = tf.train.ClusterSpec({"worker": workers})
    # The group leader must be in the server's session config: configure_collective_ops alone
    # leaves every task believing it leads, and the first collective then waits forever.
    session_config = config_pb2.ConfigProto()
    session_config.experimental.collective_group_leader = leader
    server_def = tensorflow_server_pb2.ServerDef(
      cluster=cluster.as_cluster_def(),
      default_session_config=session_config,
      job_name="worker",
      task_index=rank,
      protocol="grpc",
    )
    context.context().configure_collective_ops(collective_leader=leader)
    context.context().enable_collective_ops(server_def)
    communicator = Communicator(
      rank,
      len(workers),
      new_group_key(),
      f"/job:worker/replica:0/task:{rank}/device:{device}",
      hint,
      timeout=collective_timeout,
    )
    if _MONITOR is not None:
      _MONITOR.stop()
      _MONITOR = None
    if peer_check_seconds > 0:
      # Every worker is up once a first collective of all of them has completed; a worker that
      # never comes fails this one after the collective timeout.
      communicator.all_reduce(tf.zeros([1]))
      _MONITOR = PeerMonitor(rank, len(workers), peer_check_seconds).start()
  set_default_communicator(communicator)
  return communicator
