"""Checkpoints of model-parallel training that any number of workers can restore.

A per-worker `tf.train.Checkpoint` holds each worker's shards, so it restores only on the same
worker count and plan. `save_checkpoint` writes one file instead: every DistributedEmbedding's
global tables and the optimizer's per-row state for them (assembled with the same collectives as
`get_weights`), plus rank 0's copy of every other weight and optimizer variable. Restoring on M
workers slices out each worker's shards. `BackupAndRestore` does this at every epoch end of
`model.fit` and resumes from it, like `keras.callbacks.BackupAndRestore`.
"""

import io
import os

import keras
import numpy as np
import tensorflow as tf

from distributed_embeddings.python.layers import dist_embedding
from distributed_embeddings.python.parallel import communicator as comm_lib

_FORMAT_VERSION = 1


def _distributed_layers(model):
  """The model's DistributedEmbedding layers, in its layer order (their keys are positions)."""
  return [
    l
    for l in model._flatten_layers(include_self=False)  # pylint: disable=protected-access
    if isinstance(l, dist_embedding.DistributedEmbedding)
  ]


def _other_state(model, optimizer, layers):
  """{key: variable} of everything outside the DistributedEmbedding tables and their slots."""
  owned = set()
  for layer in layers:
    owned.update(id(v) for v in layer.table_variables)
    if optimizer is not None:
      for by_var in layer.optimizer_slot_variables(optimizer).values():
        owned.update(id(v) for v in by_var.values())
  # Keyed by position, not name: automatic layer names depend on what else the process built,
  # and without the tables and their slots the order is the same on any worker count.
  state = {}
  groups = [("weight", model.weights)]
  if optimizer is not None:
    groups.append(("optimizer", optimizer.variables))
  for kind, variables in groups:
    for k, v in enumerate(v for v in variables if id(v) not in owned):
      state[f"{kind}/{k}"] = v
  return state


def _build_optimizer(model, optimizer):
  if optimizer is not None and not optimizer.built:
    optimizer.build(model.trainable_variables)


def save_checkpoint(path, model, optimizer=None, communicator=None, metadata=None):
  """Writes `model` (and `optimizer`) to the file `path` (.npz), independent of the worker count.

  Collective: every worker calls it; rank 0 writes the file atomically (a partial file never
  replaces a good one). `metadata` is a dict of numbers saved alongside (e.g. the epoch).
  """
  comm = communicator or comm_lib.default_communicator()
  _build_optimizer(model, optimizer)
  layers = _distributed_layers(model)
  arrays = {"meta/format_version": np.array(_FORMAT_VERSION)}
  for key, value in (metadata or {}).items():
    arrays[f"meta/{key}"] = np.asarray(value)
  for k, layer in enumerate(layers):
    for t, table in enumerate(layer.get_weights()):
      arrays[f"embedding/{k}/table{t}"] = table
    if optimizer is not None:
      for slot, tables in layer.get_optimizer_slots(optimizer).items():
        for t, table in enumerate(tables):
          arrays[f"embedding/{k}/slot/{slot}/table{t}"] = table
  for key, v in _other_state(model, optimizer, layers).items():
    arrays[key] = np.asarray(keras.ops.convert_to_numpy(v.value))
  if comm.rank == 0:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
      f.write(buffer.getvalue())
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  comm.all_reduce(tf.zeros([1]))  # Nobody returns before the file is in place.


def restore_checkpoint(path, model, optimizer=None):
  """Loads a file written by save_checkpoint (by any worker count) into `model` and `optimizer`;
  returns its metadata dict. Collective only in that every worker reads the file itself."""
  _build_optimizer(model, optimizer)
  with np.load(path) as data:
    arrays = {key: data[key] for key in data.files}
  version = int(arrays.get("meta/format_version", -1))
  if version != _FORMAT_VERSION:
    raise ValueError(
      f"restore_checkpoint: {path} has format version {version}; expected {_FORMAT_VERSION}."
    )
  layers = _distributed_layers(model)
  expected = dict(_other_state(model, optimizer, layers))
  missing = [key for key in expected if key not in arrays]
  missing += [
    f"(unexpected) {key}"
    for key in arrays
    if key.split("/")[0] in ("weight", "optimizer") and key not in expected
  ]
  for k, layer in enumerate(layers):
    prefix = f"embedding/{k}/"
    n = len(layer.plan.tables)
    missing += [f"{prefix}table{t}" for t in range(n) if f"{prefix}table{t}" not in arrays]
  if missing:
    raise ValueError(
      f"restore_checkpoint: {path} does not match the model: "
      f"{sorted(missing)[:8]} ({len(missing)} entries in all)."
    )
  for k, layer in enumerate(layers):
    prefix = f"embedding/{k}/"
    n = len(layer.plan.tables)
    if not layer.built:
      layer.build()
    layer.set_weights([arrays[f"{prefix}table{t}"] for t in range(n)])
    if optimizer is not None:
      names = {
        key[len(prefix + "slot/") :].rsplit("/", 1)[0]
        for key in arrays
        if key.startswith(prefix + "slot/")
      }
      layer.set_optimizer_slots(
        optimizer,
        {name: [arrays[f"{prefix}slot/{name}/table{t}"] for t in range(n)] for name in names},
      )
  for key, v in expected.items():
    if tuple(arrays[key].shape) != tuple(v.shape):
      raise ValueError(
        f"restore_checkpoint: {key} ({v.path}) has shape {arrays[key].shape} "
        f"in {path}; the model's is {tuple(v.shape)}."
      )
    v.assign(arrays[key])
  return {key[len("meta/") :]: arrays[key].item() for key in arrays if key.startswith("meta/")}


class BackupAndRestore(keras.callbacks.Callback):
  """`keras.callbacks.BackupAndRestore` for model-parallel training.

  At the end of every epoch all workers write one checkpoint (`save_checkpoint`) to
  `backup_dir`. When `fit` starts and a checkpoint is there, every worker restores it, whatever
  worker count wrote it, and training resumes at the epoch after the saved one. After a
  successful `fit` the checkpoint is deleted unless `delete_checkpoint=False`.
  """

  def __init__(self, backup_dir, communicator=None, delete_checkpoint=True):
    super().__init__()
    self.backup_dir = backup_dir
    self.communicator = communicator
    self.delete_checkpoint = delete_checkpoint
    self.path = os.path.join(backup_dir, "checkpoint.npz")

  def on_train_begin(self, logs=None):
    if os.path.exists(self.path):
      metadata = restore_checkpoint(self.path, self.model, self.model.optimizer)
      self.model._initial_epoch = int(metadata["epoch"])  # pylint: disable=protected-access

  def on_epoch_end(self, epoch, logs=None):
    comm = self.communicator or comm_lib.default_communicator()
    if comm.rank == 0:
      os.makedirs(self.backup_dir, exist_ok=True)
    save_checkpoint(
      self.path, self.model, self.model.optimizer, comm, metadata={"epoch": epoch + 1}
    )

  def on_train_end(self, logs=None):
    comm = self.communicator or comm_lib.default_communicator()
    if self.delete_checkpoint and comm.rank == 0 and os.path.exists(self.path):
      os.remove(self.path)
    self.model._initial_epoch = None  # pylint: disable=protected-access
