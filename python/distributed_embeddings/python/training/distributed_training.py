"""The Horovod-style training API over model-parallel embeddings, on our own communicator.

Gradients of sharded tables are complete on the worker that owns the shard: the all-to-all's
backward already summed every worker's contribution. Every other gradient (dense layers,
replicated tables) is one worker's share and gets averaged. `DistributedGradientTape` and
`DistributedOptimizer` do that, so N workers train like one worker on the global batch;
`broadcast_variables` and `BroadcastGlobalVariablesCallback` give every worker the root's
replicated state and leave the shards alone.

Which variables are shards is asked of the live `DistributedEmbedding` layers themselves
(`register_sharded_layer`), at the moment of asking: Keras creates a layer's variables lazily
(inside a symbolic first call its variables have no storage yet), so no identity recorded when
the layer is built would survive.
"""

import ctypes
import threading
import weakref

import keras
import tensorflow as tf

from distributed_embeddings.python.ops import embedding_lookup_ops
from distributed_embeddings.python.parallel import communicator as comm_lib
from distributed_embeddings.python.training import sparse_updates

_SHARDED_LAYERS = weakref.WeakSet()
_SHARDED_LAYERS_LOCK = threading.Lock()


def register_sharded_layer(layer):
  """Records `layer`, whose `sharded_variables()` lists variables that differ between workers by
  design. The record dies with the layer."""
  with _SHARDED_LAYERS_LOCK:
    _SHARDED_LAYERS.add(layer)


def _sharded_variables():
  """{id: object} of every live sharded variable and of the tf.Variable holding its value."""
  with _SHARDED_LAYERS_LOCK:
    layers = list(_SHARDED_LAYERS)
  found = {}
  for layer in layers:
    for v in layer.sharded_variables():
      found[id(v)] = v
      inner = sparse_updates.backing_variable(v)
      found[id(inner)] = inner
  return found


def release_freed_memory():
  """Hands memory freed by moving whole tables (gRPC's message buffers, NumPy temporaries) back
  to the operating system: glibc keeps freed blocks of its heap and arenas otherwise, and with
  several workers on one host that retained memory is what runs out. No-op off glibc."""
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):
    pass


def embedding_value(variable):
  """A variable's value read without the whole-buffer copy TensorFlow's read makes in
  copy-on-read mode (the mode sparse updates leave a table in)."""
  return embedding_lookup_ops.read_var_no_copy(variable)


def _is_in(variable, found):
  return found.get(id(variable)) is variable


def is_model_parallel(variable):
  """True for a shard variable of a DistributedEmbedding with more than one worker: the Keras
  variable itself or the tf.Variable that holds its value."""
  return _is_in(variable, _sharded_variables())


def shard_slot_prefixes(variables):
  """Name prefixes of the optimizer slots of the shards among `variables`: Keras names a slot
  '<its variable's path with _ for />_<slot name>'."""
  found = _sharded_variables()
  return tuple(v.path.replace("/", "_") + "_" for v in variables if _is_in(v, found))


def reduce_gradients(grads, variables, communicator, sparse_as_dense=False):
  """Sharded-table gradients scaled by 1 / world_size (complete on their owner, and each
  worker's loss is a mean over its local batch); every other gradient averaged over the workers.
  A sparse gradient (IndexedSlices, e.g. of a replicated table) is gathered sparse: its rows
  from every worker, values divided by the world size, as Horovod does. Each variable's
  reduction has its own collective call site, so workers agree on the instance keys however
  often each has retraced the training step."""
  n = communicator.world_size
  found = _sharded_variables() if n > 1 else {}
  out = []
  for g, v in zip(grads, variables):
    if g is None or n == 1:
      out.append(g)
    elif _is_in(v, found):
      out.append(
        sparse_updates.scale_sparse_gradient(g, n) if isinstance(g, tf.IndexedSlices) else g / n
      )
    elif isinstance(g, tf.IndexedSlices) and not sparse_as_dense:
      indices, values = communicator.all_gather_v(
        [g.indices, g.values], site=communicator.site(v, "sparse_gradient")
      )
      out.append(tf.IndexedSlices(values / n, indices, g.dense_shape))
    else:
      out.append(
        communicator.all_reduce(
          tf.convert_to_tensor(g), op="mean", site=communicator.site(v, "gradient")
        )
      )
  return out


def _communicator(communicator, api):
  if communicator is not None and not isinstance(communicator, comm_lib.Communicator):
    raise TypeError(f"{api}: 'communicator' must be a Communicator or None; got {communicator!r}.")
  return communicator or comm_lib.default_communicator()


def _check_horovod_options(
  api, compression=None, gradient_predivide_factor=1.0, backward_passes_per_step=1
):
  """Horovod's options that would change the numbers must keep their defaults here."""
  if (
    compression is not None
    and getattr(compression, "__name__", type(compression).__name__) != "NoneCompressor"
  ):
    raise ValueError(
      f"{api}: 'compression' is not supported (gradients travel uncompressed); got {compression!r}."
    )
  if gradient_predivide_factor != 1.0:
    raise ValueError(
      f"{api}: 'gradient_predivide_factor' must be 1.0; got {gradient_predivide_factor!r}."
    )
  if backward_passes_per_step != 1:
    raise ValueError(
      f"{api}: 'backward_passes_per_step' must be 1 (gradients are not "
      f"accumulated locally); got {backward_passes_per_step!r}."
    )


class DistributedGradientTape:
  """Wraps a tf.GradientTape so that `gradient` returns the gradients of the global batch:
  sharded tables' gradients scaled, every other gradient averaged over the workers (sparse ones
  gathered sparse, or all-reduced dense with `sparse_as_dense=True`). Other tape methods
  (watched_variables, ...) pass through.

  The keyword arguments are the reference (Horovod) API's: `device_dense` and `device_sparse`
  are accepted and have no effect (the communicator places the collectives); `compression` and
  `gradient_predivide_factor` must keep their defaults.
  """

  def __init__(
    self,
    tape,
    communicator=None,
    *,
    device_dense="",
    device_sparse="",
    compression=None,
    sparse_as_dense=False,
    gradient_predivide_factor=1.0,
  ):
    del device_dense, device_sparse
    _check_horovod_options("DistributedGradientTape", compression, gradient_predivide_factor)
    self._tape = tape
    self._comm = _communicator(communicator, "DistributedGradientTape")
    self._sparse_as_dense = bool(sparse_as_dense)

  def gradient(
    self, target, sources, output_gradients=None, unconnected_gradients=tf.UnconnectedGradients.NONE
  ):
    grads = self._tape.gradient(
      target,
      sources,
      output_gradients=output_gradients,
      unconnected_gradients=unconnected_gradients,
    )
    reduced = reduce_gradients(
      tf.nest.flatten(grads), tf.nest.flatten(sources), self._comm, self._sparse_as_dense
    )
    return tf.nest.pack_sequence_as(grads, reduced)

  def __getattr__(self, name):
    return getattr(self._tape, name)


def DistributedOptimizer(
  optimizer,
  communicator=None,
  *,
  name=None,
  device_dense="",
  device_sparse="",
  compression=None,
  sparse_as_dense=False,
  gradient_predivide_factor=1.0,
  backward_passes_per_step=1,
  average_aggregated_gradients=False,
  lazy_sparse_updates=False,
):  # pylint: disable=invalid-name
  """A new optimizer, built from `optimizer`'s config, that reduces gradients across workers
  before applying them (as DistributedGradientTape does), so `model.fit` trains on the global
  batch. As in the reference API, `optimizer` itself is left as it was; since its state would not
  carry over, wrapping one that has already been used is an error.

  With Keras's `SGD` (without momentum) and `Adagrad`, and with our `RowwiseAdagrad`, a sparse
  gradient (an embedding table's `IndexedSlices`) updates only the rows it touches, in one fused
  kernel per table on the CPU. Keras's own Adagrad update runs over the whole table every step;
  for a gradient with each id once both give the same numbers, bit for bit (repeated ids are
  summed before the rule sees them, as the Adagrad rule says; Keras 3 applies each piece). Other
  optimizers apply their own rules unchanged, unless `lazy_sparse_updates=True`: then Keras's
  `Adam` also updates only the rows a sparse gradient touches, and rows without gradient keep
  their moments (lazy Adam, as TF1's LazyAdamOptimizer and FBGEMM do). That changes the results,
  hence opt-in; it is an error for other optimizers. Dense variables always get Keras's update.
  In a traced step, a table's gradient that comes straight from our lookup is applied by a kernel
  that also does the lookup's backward, so the summed gradient is never written out (same
  numbers; see `sparse_updates`). On one worker the wrapper does no communication and only
  changes how sparse gradients apply.

  The keyword arguments are the reference (Horovod) API's: `sparse_as_dense` all-reduces sparse
  gradients of replicated variables densely; `name`, `device_dense`, `device_sparse` and
  `average_aggregated_gradients` are accepted and have no effect here; `compression`,
  `gradient_predivide_factor` and `backward_passes_per_step` must keep their defaults.
  """
  del name, device_dense, device_sparse, average_aggregated_gradients
  _check_horovod_options(
    "DistributedOptimizer", compression, gradient_predivide_factor, backward_passes_per_step
  )
  comm = _communicator(communicator, "DistributedOptimizer")
  if not isinstance(optimizer, keras.optimizers.Optimizer):
    raise TypeError(
      f"DistributedOptimizer: 'optimizer' must be a Keras optimizer; got {optimizer!r}."
    )
  if optimizer.built:
    raise ValueError(
      "DistributedOptimizer: 'optimizer' has already been used (it has state); "
      "wrap it before training."
    )
  if not isinstance(lazy_sparse_updates, bool):
    raise TypeError(
      f"DistributedOptimizer: 'lazy_sparse_updates' must be a bool; got {lazy_sparse_updates!r}."
    )
  base = type(optimizer)
  sparse_update_step = sparse_updates.equivalent_step(optimizer)
  if lazy_sparse_updates:
    if base not in sparse_updates.LAZY_STEPS:
      raise ValueError(
        f"DistributedOptimizer: 'lazy_sparse_updates' is supported for "
        f"{sorted(t.__name__ for t in sparse_updates.LAZY_STEPS)}; got "
        f"{base.__name__}."
      )
    sparse_update_step = sparse_updates.LAZY_STEPS[base]
  dense = bool(sparse_as_dense)

  class _DistributedOptimizer(base):
    def apply(self, grads, trainable_variables=None):  # pylint: disable=missing-function-docstring
      variables = (
        trainable_variables if trainable_variables is not None else self._trainable_variables
      )
      return super().apply(
        reduce_gradients(list(grads), list(variables), comm, dense), trainable_variables
      )

    def update_step(self, gradient, variable, learning_rate):  # pylint: disable=missing-function-docstring
      if sparse_update_step is not None and isinstance(gradient, tf.IndexedSlices):
        return sparse_update_step(self, gradient, variable, learning_rate)
      return super().update_step(gradient, variable, learning_rate)

  _DistributedOptimizer.__name__ = base.__name__
  _DistributedOptimizer.__qualname__ = base.__qualname__
  return _DistributedOptimizer.from_config(optimizer.get_config())


def broadcast_variables(variables, root_rank=0, communicator=None):
  """Gives every worker `root_rank`'s values of `variables`, skipping sharded tables (each worker
  owns different shards). Call on every worker, with the same variables in the same order."""
  comm = _communicator(communicator, "broadcast_variables")
  if comm.world_size == 1:
    return
  found = _sharded_variables()
  for v in variables:
    if _is_in(v, found):
      continue
    if not tf.executing_eagerly():
      v.assign(comm.broadcast(tf.convert_to_tensor(v), root_rank))
      continue
    target = sparse_updates.backing_variable(v)
    comm.broadcast_variable(
      target, root_rank, embedding_value(target) if comm.rank == root_rank else None
    )
  release_freed_memory()


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
      sharded = shard_slot_prefixes(variables)
      variables += [v for v in optimizer.variables if not v.name.startswith(sharded)]
    broadcast_variables(variables, root_rank=self.root_rank, communicator=self.communicator)
    self.broadcast_done = True
