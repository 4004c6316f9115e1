"""Collective communication among workers on TensorFlow's own collective ops (no Horovod).

A `Communicator` is one worker's handle on a group of `world_size` workers: all-reduce,
all-gather, broadcast and all-to-all, with gradients, and variable-size all-gather and
all-to-all. Every worker must issue the same collectives in the same order; instance keys come
from a per-communicator counter, so identical programs agree on them. Workers are one of:
  * the only worker (world_size 1): every collective is the identity, nothing is sent;
  * threads of one process, each on its own logical device (`run_in_threads`, or the replica
    threads of a MirroredStrategy), the unit-test harness;
  * processes connected over gRPC (`init_from_env`, set up by `distributed_embeddings.launch`).
Instance keys stay bounded. TensorFlow caches a collective's parameters (shape included) per
instance key for the life of the process, ~3 KB each. Inside a tf.function every call site takes
its keys when it is traced, so workers must retrace alike (give varying dimensions as None).
Eagerly, one key serves every call with the same signature (kind, shape, dtype), which is safe
because an eager collective finishes before the next one starts. Variable-size exchanges pad to a
power of two and pick their key by that power, so one key never sees two shapes. Each
communicator carries an ordering token (a resource variable on its device): chaining its
collectives through it keeps them in program order inside a tf.function, which they need to avoid
cross-device deadlocks.
"""

import itertools
import os
import pickle
import threading

import numpy as np
import tensorflow as tf
from tensorflow.python.ops import collective_ops
from tensorflow.python.ops import resource_variable_ops

_GROUP_KEYS = itertools.count(1000)  # Clear of the keys tf.distribute strategies use.
_KEYS_PER_GROUP = 100_000  # Instance keys are int32: room for ~20000 groups.
_SIZE_BUCKETS = 63  # Keys per variable-size call site: padded sizes 2**0 .. 2**62.
_GROUP_KEYS_LOCK = threading.Lock()


def _size_bucket(largest):
  """(exponent, 2**exponent): the smallest power of two >= max(largest, 1), for int64 sizes.
  The exponent is the bit length of largest - 1."""
  largest = tf.maximum(largest, 1)
  exponent = tf.reduce_sum(tf.cast(
      tf.bitwise.right_shift(largest - 1, tf.range(_SIZE_BUCKETS, dtype=tf.int64)) > 0, tf.int32))
  return exponent, tf.bitwise.left_shift(tf.constant(1, tf.int64), tf.cast(exponent, tf.int64))


def new_group_key():
  """A group key for a new group; every worker must create its groups in the same order."""
  with _GROUP_KEYS_LOCK:
    return next(_GROUP_KEYS)


class Communicator:
  """Worker `rank` of `world_size`, communicating within `group_key` on `device`."""

  def __init__(self, rank, world_size, group_key=None, device=None, communication_hint="auto"):
    if not 0 <= rank < world_size:
      raise ValueError(f"'rank' must be in [0, {world_size}); got {rank}.")
    self.rank = rank
    self.world_size = world_size
    self.group_key = group_key if group_key is not None else 1000
    self.device = device
    self.communication_hint = communication_hint
    # TensorFlow caches a collective's parameters per instance key for the life of the process,
    # whatever the group: each group gets its own key range.
    self._next_key = self.group_key * _KEYS_PER_GROUP
    self._eager_keys = {}
    self._token = None
    if world_size > 1:
      with tf.init_scope(), tf.device(device):
        self._token = resource_variable_ops.ResourceVariable(0.0, trainable=False,
                                                             name=f"collective_order_{rank}")

  def _reserve_keys(self, count):
    key = self._next_key
    if key + count > (self.group_key + 1) * _KEYS_PER_GROUP:
      raise RuntimeError(f"Communicator (group {self.group_key}) ran out of collective instance "
                         f"keys after {_KEYS_PER_GROUP} call sites; trace fewer functions.")
    self._next_key += count
    return key

  def _instance_key(self, signature, count=1):
    """First of `count` keys for a collective: per call site when tracing, per signature
    eagerly. Every worker issues the same collectives in order, so all agree on the keys."""
    if not tf.executing_eagerly():
      return self._reserve_keys(count)
    if signature not in self._eager_keys:
      self._eager_keys[signature] = self._reserve_keys(count)
    return self._eager_keys[signature]

  def _common(self, kind, tensor):
    key = self._instance_key((kind, tuple(tensor.shape), tensor.dtype))
    return dict(group_size=self.world_size, group_key=self.group_key, instance_key=key,
                communication_hint=self.communication_hint, ordering_token=self._token.handle)

  def all_reduce(self, tensor, op="sum"):
    """Sum (or mean) of `tensor` over workers; its gradient is the all-reduce of the gradient."""
    if self.world_size == 1:
      return tf.identity(tensor)
    merge = {"sum": "Add", "mean": "Add"}[op]

    @tf.custom_gradient
    def reduce(x):
      with tf.device(self.device):
        y = collective_ops.all_reduce_v2(x, merge_op=merge, final_op="Id",
                                        **self._common("all_reduce", x))
        if op == "mean":
          y = y / self.world_size

      def grad(dy):
        return self.all_reduce(dy, op)

      return y, grad

    return reduce(tensor)

  def all_gather(self, tensor):
    """Concatenation along axis 0 of every worker's `tensor` (same shape everywhere), in rank
    order. Its gradient is each worker's slice of the summed gradient."""
    if self.world_size == 1:
      return tf.identity(tensor)

    @tf.custom_gradient
    def gather(x):
      with tf.device(self.device):
        y = collective_ops.all_gather_v2(x, **self._common("all_gather", x))

      def grad(dy):
        total = self.all_reduce(dy)
        rows = tf.shape(x)[0]
        return total[self.rank * rows:(self.rank + 1) * rows]

      return y, grad

    if not tensor.dtype.is_floating:
      with tf.device(self.device):
        return collective_ops.all_gather_v2(tensor, **self._common("all_gather", tensor))
    return gather(tensor)

  def all_gather_v(self, tensor):
    """Concatenation along axis 0 of every worker's `tensor`, whose first dimension may differ
    between workers (the others must agree), in rank order. Not differentiable: it moves ids.

    The sizes are all-gathered first; each worker pads to the next power of two of the largest,
    exchanges, and drops the padding.
    """
    tensor = tf.convert_to_tensor(tensor)
    if self.world_size == 1:
      return tf.identity(tensor)
    base_key = self._instance_key(("all_gather_v", tuple(tensor.shape[1:]), tensor.dtype),
                                  _SIZE_BUCKETS)
    with tf.device(self.device):
      sizes = self.all_gather(tf.shape(tensor, out_type=tf.int64)[:1])
      exponent, bucket = _size_bucket(tf.reduce_max(sizes))
      trailing = tf.shape(tensor, out_type=tf.int64)[1:]
      filler = tf.zeros(tf.concat([[bucket - sizes[self.rank]], trailing], 0), tensor.dtype)
      padded = tf.concat([tensor, filler], 0)
      gathered = collective_ops.all_gather_v2(
          padded, group_size=self.world_size, group_key=self.group_key,
          instance_key=base_key + exponent, communication_hint=self.communication_hint,
          ordering_token=self._token.handle)
      per_worker = tf.reshape(gathered, tf.concat([[self.world_size, bucket], trailing], 0))
      return tf.boolean_mask(per_worker, tf.sequence_mask(sizes, bucket))

  def all_to_all(self, tensor):
    """Exchanges equal chunks: `tensor` is [world_size, ...]; row w goes to worker w, and row w
    of the result came from worker w. All-to-all is its own adjoint, which gives the gradient."""
    if self.world_size == 1:
      return tf.identity(tensor)

    def exchange(x):
      with tf.device(self.device):
        flat = tf.reshape(x, [self.world_size, -1])
        return tf.reshape(collective_ops.all_to_all_v2(flat, **self._common("all_to_all", flat)),
                          tf.shape(x))

    if not tensor.dtype.is_floating:
      return exchange(tensor)

    @tf.custom_gradient
    def differentiable(x):
      def grad(dy):
        return exchange(dy)

      return exchange(x), grad

    return differentiable(tensor)

  def all_to_all_v(self, chunks):
    """Variable-size all-to-all: `chunks` is a list of world_size tensors, chunks[w] going to
    worker w; their first dimensions may differ (the rest must agree everywhere). Returns the
    list of what each worker sent here, in rank order. Differentiable for floating dtypes: the
    gradient runs the same exchange backwards.

    Block sizes are exchanged first; every block is padded to the next power of two of the
    largest block anywhere, so the padded exchange's instance key is picked by that power. In a
    tf.function, give the chunks an unknown first dimension (input_signature): keys are taken
    at trace time, so every worker must trace the same number of times.
    """
    chunks = [tf.convert_to_tensor(c) for c in chunks]
    if len(chunks) != self.world_size:
      raise ValueError(f"all_to_all_v: expected {self.world_size} chunks; got {len(chunks)}.")
    if self.world_size == 1:
      return [tf.identity(chunks[0])]
    trailing_shape = tuple(chunks[0].shape[1:])
    dtype = chunks[0].dtype
    # One key range for the forward exchange, one for the backward: both may run in one step.
    base_key = self._instance_key(("all_to_all_v", trailing_shape, dtype), 2 * _SIZE_BUCKETS)
    with tf.device(self.device):
      send_sizes = tf.stack([tf.shape(c, out_type=tf.int64)[0] for c in chunks])
      # recv_sizes[w]: rows worker w sends here.
      recv_sizes = tf.reshape(self.all_to_all(tf.reshape(send_sizes, [self.world_size, 1])), [-1])
      largest = self.all_reduce_max(tf.reduce_max(send_sizes))

    def exchange(blocks, sizes_out, sizes_in, first_key):
      with tf.device(self.device):
        exponent, bucket = _size_bucket(largest)
        trailing = tf.shape(blocks[0], out_type=tf.int64)[1:]
        padded = tf.stack([
            tf.concat([b, tf.zeros(tf.concat([[bucket - n], trailing], 0), b.dtype)], 0)
            for b, n in zip(blocks, tf.unstack(sizes_out))])
        flat = tf.reshape(padded, [self.world_size, -1])
        received = collective_ops.all_to_all_v2(
            flat, group_size=self.world_size, group_key=self.group_key,
            instance_key=first_key + exponent, communication_hint=self.communication_hint,
            ordering_token=self._token.handle)
        received = tf.reshape(received, tf.concat([[self.world_size, bucket], trailing], 0))
        return [received[w, :sizes_in[w]] for w in range(self.world_size)]

    if not dtype.is_floating:
      return exchange(chunks, send_sizes, recv_sizes, base_key)

    @tf.custom_gradient
    def differentiable(*blocks):
      def grad(*dys):
        return exchange([tf.convert_to_tensor(dy) for dy in dys], recv_sizes, send_sizes,
                        base_key + _SIZE_BUCKETS)

      return exchange(list(blocks), send_sizes, recv_sizes, base_key), grad

    return list(differentiable(*chunks))

  def all_reduce_max(self, tensor):
    """Element-wise maximum of `tensor` over workers (not differentiable)."""
    if self.world_size == 1:
      return tf.identity(tensor)
    with tf.device(self.device):
      return collective_ops.all_reduce_v2(tensor, merge_op="Max", final_op="Id",
                                          **self._common("all_reduce_max", tensor))

  def broadcast(self, tensor, root=0):
    """`tensor` of worker `root`, on every worker (all-reduce of zeros elsewhere)."""
    if self.world_size == 1:
      return tf.identity(tensor)
    contribution = tensor if self.rank == root else tf.zeros_like(tensor)
    if tensor.dtype.is_integer or tensor.dtype == tf.bool:
      return tf.cast(self.all_reduce(tf.cast(contribution, tf.int64)), tensor.dtype)
    return self.all_reduce(contribution)

  def broadcast_object(self, obj, root=0):
    """Worker `root`'s `obj` (anything picklable: a seed, a config), on every worker; eager
    only. The reference API's `hvd.broadcast_object`. Pickles come from the job's own workers."""
    if self.world_size == 1:
      return obj
    if not tf.executing_eagerly():
      raise RuntimeError("broadcast_object runs eagerly only; call it outside tf.function.")
    payload = np.frombuffer(pickle.dumps(obj), np.uint8) if self.rank == root else None
    size = self.broadcast(tf.constant([0 if payload is None else payload.size], tf.int64), root)
    data = payload.astype(np.int32) if payload is not None else np.zeros(int(size[0]), np.int32)
    received = self.broadcast(tf.constant(data), root).numpy().astype(np.uint8)
    return obj if self.rank == root else pickle.loads(received.tobytes())


def run_in_threads(world_size, fn):
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
        results[rank] = fn(Communicator(rank, world_size, group_key, device))
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
      cpus[0], [tf.config.LogicalDeviceConfiguration() for _ in range(count)])


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
      raise ValueError(f"Environment variable {name} must be a worker index; got {value!r}") \
          from None
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
      warnings.warn(f"init_from_env: TensorFlow had already initialized its devices, so this "
                    f"worker could not be limited to GPU {gpu_index}; call init_from_env before "
                    f"any other TensorFlow work.", RuntimeWarning, stacklevel=3)
    return f"GPU:{gpu_index}"


def init_from_env():
  """Joins the workers named by TF_CONFIG (as `distributed_embeddings.launch` sets it).

  Each process calls this once, before creating variables. It connects the processes over gRPC
  for TensorFlow's collective ops, makes the resulting communicator the default one, and returns
  it. Without TF_CONFIG the process is the only worker. On a host with GPUs each worker keeps one
  of them (by local rank: `DE_LOCAL_RANK`, which the launcher sets, `LOCAL_RANK` or
  `OMPI_COMM_WORLD_LOCAL_RANK`, else its task index), and collectives run on it over NCCL.
  """
  import json  # pylint: disable=import-outside-toplevel
  from tensorflow.core.protobuf import config_pb2  # pylint: disable=import-outside-toplevel
  from tensorflow.core.protobuf import tensorflow_server_pb2  # pylint: disable=import-outside-toplevel
  from tensorflow.python.eager import context  # pylint: disable=import-outside-toplevel

  config = json.loads(os.environ.get("TF_CONFIG", "{}"))
  workers = config.get("cluster", {}).get("worker", [])
  if len(workers) <= 1:
    communicator = Communicator(0, 1)
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
    server_def = tensorflow_server_pb2.ServerDef(cluster=cluster.as_cluster_def(),
                                                 default_session_config=session_config,
                                                 job_name="worker", task_index=rank,
                                                 protocol="grpc")
    context.context().configure_collective_ops(collective_leader=leader)
    context.context().enable_collective_ops(server_def)
    communicator = Communicator(rank, len(workers), new_group_key(),
                                f"/job:worker/replica:0/task:{rank}/device:{device}", hint)
  set_default_communicator(communicator)
  return communicator
