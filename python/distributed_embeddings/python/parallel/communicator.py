"""Collective communication among workers on TensorFlow's own collective ops (no Horovod).

A `Communicator` is one worker's handle on a group of `world_size` workers: all-reduce,
all-gather, broadcast and all-to-all, with gradients. Every worker must issue the same collectives
in the same order; instance keys come from a per-communicator counter, so identical programs
agree on them. Workers are one of:
  * the only worker (world_size 1): every collective is the identity, nothing is sent;
  * threads of one process, each on its own logical device (`run_in_threads`), the unit-test
    harness;
  * processes connected over gRPC (`init_from_env`, set up by `distributed_embeddings.launch`).
Eager collectives take a new instance key per call (TensorFlow keeps ~3 KB per key for the life
of the process); inside a tf.function keys are fixed when it is traced. Each communicator carries
an ordering token (a resource variable on its device): chaining its
collectives through it keeps them in program order inside a tf.function, which they need to avoid
cross-device deadlocks.
"""

import itertools
import threading

import tensorflow as tf
from tensorflow.python.ops import collective_ops
from tensorflow.python.ops import resource_variable_ops

_GROUP_KEYS = itertools.count(1000)  # Clear of the keys tf.distribute strategies use.
_KEYS_PER_GROUP = 100_000  # Instance keys are int32: room for ~20000 groups.
_GROUP_KEYS_LOCK = threading.Lock()


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
    self._instance_keys = itertools.count(self.group_key * _KEYS_PER_GROUP)
    self._token = None
    if world_size > 1:
      with tf.init_scope(), tf.device(device):
        self._token = resource_variable_ops.ResourceVariable(0.0, trainable=False,
                                                             name=f"collective_order_{rank}")

  def _common(self):
    return dict(group_size=self.world_size, group_key=self.group_key,
                instance_key=next(self._instance_keys), communication_hint=self.communication_hint,
                ordering_token=self._token.handle)

  def all_reduce(self, tensor, op="sum"):
    """Sum (or mean) of `tensor` over workers; its gradient is the all-reduce of the gradient."""
    if self.world_size == 1:
      return tf.identity(tensor)
    merge = {"sum": "Add", "mean": "Add"}[op]

    @tf.custom_gradient
    def reduce(x):
      with tf.device(self.device):
        y = collective_ops.all_reduce_v2(x, merge_op=merge, final_op="Id", **self._common())
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
        y = collective_ops.all_gather_v2(x, **self._common())

      def grad(dy):
        total = self.all_reduce(dy)
        rows = tf.shape(x)[0]
        return total[self.rank * rows:(self.rank + 1) * rows]

      return y, grad

    if not tensor.dtype.is_floating:
      with tf.device(self.device):
        return collective_ops.all_gather_v2(tensor, **self._common())
    return gather(tensor)

  def all_to_all(self, tensor):
    """Exchanges equal chunks: `tensor` is [world_size, ...]; row w goes to worker w, and row w
    of the result came from worker w. All-to-all is its own adjoint, which gives the gradient."""
    if self.world_size == 1:
      return tf.identity(tensor)

    def exchange(x):
      with tf.device(self.device):
        flat = tf.reshape(x, [self.world_size, -1])
        return tf.reshape(collective_ops.all_to_all_v2(flat, **self._common()), tf.shape(x))

    if not tensor.dtype.is_floating:
      return exchange(tensor)

    @tf.custom_gradient
    def differentiable(x):
      def grad(dy):
        return exchange(dy)

      return exchange(x), grad

    return differentiable(tensor)

  def broadcast(self, tensor, root=0):
    """`tensor` of worker `root`, on every worker (all-reduce of zeros elsewhere)."""
    if self.world_size == 1:
      return tf.identity(tensor)
    contribution = tensor if self.rank == root else tf.zeros_like(tensor)
    if tensor.dtype.is_integer or tensor.dtype == tf.bool:
      return tf.cast(self.all_reduce(tf.cast(contribution, tf.int64)), tensor.dtype)
    return self.all_reduce(contribution)


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


def init_from_env():
  """Joins the workers named by TF_CONFIG (as `distributed_embeddings.launch` sets it).

  Each process calls this once, before creating variables. It connects the processes over gRPC
  for TensorFlow's collective ops, makes the resulting communicator the default one, and returns
  it. Without TF_CONFIG the process is the only worker.
  """
  import json  # pylint: disable=import-outside-toplevel
  import os  # pylint: disable=import-outside-toplevel
  from tensorflow.core.protobuf import config_pb2  # pylint: disable=import-outside-toplevel
  from tensorflow.core.protobuf import tensorflow_server_pb2  # pylint: disable=import-outside-toplevel
  from tensorflow.python.eager import context  # pylint: disable=import-outside-toplevel

  config = json.loads(os.environ.get("TF_CONFIG", "{}"))
  workers = config.get("cluster", {}).get("worker", [])
  if len(workers) <= 1:
    communicator = Communicator(0, 1)
  else:
    rank = int(config["task"]["index"])
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
    hint = "nccl" if tf.config.list_physical_devices("GPU") else "auto"
    communicator = Communicator(rank, len(workers), new_group_key(),
                                f"/job:worker/replica:0/task:{rank}/device:CPU:0", hint)
  set_default_communicator(communicator)
  return communicator
