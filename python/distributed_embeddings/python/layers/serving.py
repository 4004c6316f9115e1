"""Train on N workers, serve on one: `export_for_serving`.

A model trained with `DistributedEmbedding` on any number of workers holds only shards of its
tables, and its forward pass runs collectives. `export_for_serving` gathers every table (a
collective: every worker calls it) and, on rank 0, writes a single-process model in which each
`DistributedEmbedding` is a `ServingEmbedding`: the whole tables, one plain lookup per input, no
collectives and no launcher. With `native_ops=True` the served graph uses TensorFlow's own ops
only (gathers and segment reductions; `tf.lookup` hash tables for `IntegerLookup`), so a process
without this library, stock TF Serving included, loads the SavedModel.

Written under `path`:
  * `saved_model/`: a SavedModel whose `serving_default` signature takes the model's inputs;
  * `model.keras` (functional and Sequential models): the same model for Keras, loadable where
    this package is importable (its layers are registered Keras classes).
"""

import contextlib
import inspect
import os

import keras
import numpy as np
import tensorflow as tf

from distributed_embeddings.python.layers import dist_embedding
from distributed_embeddings.python.layers import embedding as embedding_lib


@keras.saving.register_keras_serializable(package="distributed_embeddings")
class ServingEmbedding(keras.layers.Layer):
  """What a `DistributedEmbedding` becomes in a served model: every table whole, one plain
  lookup per input, no collectives. Called like `DistributedEmbedding` on one worker: a list of
  inputs (1-D dense ids are bags of one id, giving [batch, width] with or without a combiner)
  and optional per-input `weights`.

  Args:
    tables: one dict per table: `input_dim`, `output_dim`, `combiner`.
    input_table_map: the table of each input.
    native_ops: True to look up with TensorFlow's own ops only.
  """

  def __init__(self, tables, input_table_map, native_ops=False, **kwargs):
    kwargs["autocast"] = False
    super().__init__(**kwargs)
    self.tables = [dict(t) for t in tables]
    self.input_table_map = [int(t) for t in input_table_map]
    self.native_ops = bool(native_ops)
    self.embeddings = [
      embedding_lib.Embedding(
        t["input_dim"],
        t["output_dim"],
        combiner=t.get("combiner"),
        use_custom_kernel=not self.native_ops,
        dtype=self.dtype_policy,
        name=f"table_{k}",
      )
      for k, t in enumerate(self.tables)
    ]
    for layer in self.embeddings:
      layer.build()
    self.built = True

  def call(self, inputs, weights=None):
    inputs = list(inputs)
    weights = list(weights) if weights is not None else [None] * len(inputs)
    outputs = []
    for x, w, t in zip(inputs, weights, self.input_table_map):
      layer = self.embeddings[t]
      one_hot = not isinstance(x, (tf.RaggedTensor, tf.SparseTensor)) and x.shape.rank == 1
      if one_hot:
        x = x[:, tf.newaxis]
        w = None if w is None else w[:, tf.newaxis]
      out = layer(x) if w is None else layer(x, weights=w)
      if one_hot:
        out = tf.reshape(out, [-1, layer.output_dim])
      outputs.append(out)
    return outputs

  def compute_output_spec(self, inputs, weights=None):
    specs = []
    for x, t in zip(inputs, self.input_table_map):
      width = self.tables[t]["output_dim"]
      combiner = self.tables[t].get("combiner")
      shape = tuple(x.shape)
      if len(shape) == 1:
        out = (shape[0], width)
      elif combiner is None:
        out = shape + (width,)
      else:
        out = shape[:-1] + (width,)
      ragged = getattr(x, "ragged", False) and combiner is None
      specs.append(keras.KerasTensor(out, dtype=self.compute_dtype, ragged=ragged))
    return specs

  def get_config(self):
    config = super().get_config()
    config.update(
      {
        "tables": self.tables,
        "input_table_map": self.input_table_map,
        "native_ops": self.native_ops,
      }
    )
    return config


@keras.saving.register_keras_serializable(package="distributed_embeddings")
class NativeIntegerLookup(keras.layers.Layer):
  """A frozen `IntegerLookup` on TensorFlow's own ops: a `tf.lookup` hash table from each
  vocabulary key to its id, 0 for every other key (the served model's vocabulary no longer
  grows, as in `IntegerLookup`'s inference)."""

  def __init__(self, vocabulary, **kwargs):
    kwargs["autocast"] = False
    super().__init__(**kwargs)
    self.vocabulary = [int(k) for k in vocabulary]  # keys in id order, OOV token (-1) first
    keys = tf.constant(self.vocabulary[1:], tf.int64)
    ids = tf.range(1, len(self.vocabulary), dtype=tf.int64)
    self._table = tf.lookup.StaticHashTable(
      tf.lookup.KeyValueTensorInitializer(keys, ids), default_value=tf.constant(0, tf.int64)
    )
    self.built = True

  def call(self, inputs, training=None):
    return embedding_lib.map_keys(inputs, lambda keys: self._table.lookup(tf.cast(keys, tf.int64)))

  def compute_output_spec(self, inputs, training=None):
    return embedding_lib.key_ids_spec(inputs)

  def get_config(self):
    config = super().get_config()
    config["vocabulary"] = self.vocabulary
    return config


def _layers_of(model):
  """Every layer reachable from `model`, each once, outermost first."""
  seen, order = set(), []
  stack = [model]
  while stack:
    layer = stack.pop()
    if id(layer) in seen:
      continue
    seen.add(id(layer))
    order.append(layer)
    stack.extend(reversed(list(layer._flatten_layers(include_self=False, recursive=False))))  # pylint: disable=protected-access
  return order


def _serving_layer(layer, tables, native_ops):
  """The ServingEmbedding of DistributedEmbedding `layer`, holding its gathered `tables`."""
  configs = [
    {"input_dim": int(np.shape(t)[0]), "output_dim": int(np.shape(t)[1]), "combiner": c}
    for t, c in zip(tables, layer.combiners)
  ]
  serving = ServingEmbedding(
    configs,
    layer.plan.input_table_map,
    native_ops=native_ops,
    dtype=layer.dtype_policy,
    name=layer.name,
  )
  for table_layer, table in zip(serving.embeddings, tables):
    table_layer.set_weights([table])
  return serving


def _native_lookup_layer(layer):
  vocabulary = layer.get_vocabulary()
  return NativeIntegerLookup(vocabulary, name=layer.name)


@contextlib.contextmanager
def _serving_calls(replacements):
  """Within the block, each replaced layer's calls go to its replacement (the layers stay where
  they are in the model, so any model, subclassed ones included, traces its serving graph)."""
  saved = {}
  for layer, replacement in replacements:
    saved[id(layer)] = (layer, layer.__dict__.get("call"))
    object.__setattr__(layer, "call", replacement.call)
  try:
    yield
  finally:
    for layer, call in saved.values():
      if call is None:
        object.__delattr__(layer, "call")
      else:
        object.__setattr__(layer, "call", call)


class _ServingModule(tf.Module):
  """The SavedModel's root: the serving function and every variable and table it reads."""

  def __init__(self, serve, replacements):
    super().__init__()
    self.serve = serve
    self.replacements = [r for _, r in replacements]


def _input_signature(model, input_signature):
  if input_signature is not None:
    return input_signature
  inputs = getattr(model, "inputs", None)
  if not inputs:
    raise ValueError(
      "export_for_serving: a subclassed model needs 'input_signature' (the tf.TensorSpec, "
      "tf.RaggedTensorSpec or tf.SparseTensorSpec structure of its inputs)."
    )

  def spec(x):
    dtype = tf.as_dtype(x.dtype)
    if getattr(x, "ragged", False):
      return tf.RaggedTensorSpec(x.shape, dtype, ragged_rank=1, row_splits_dtype=tf.int64)
    if getattr(x, "sparse", False):
      return tf.SparseTensorSpec(x.shape, dtype)
    return tf.TensorSpec(x.shape, dtype, name=getattr(x, "name", None))

  return [tf.nest.map_structure(spec, model._inputs_struct)]  # pylint: disable=protected-access


def export_for_serving(model, path, native_ops=False, input_signature=None):
  """Writes `model`, trained on any number of workers, as a single-process model under `path`.

  Every worker must call it (the tables are gathered with collectives); rank 0 writes and
  returns `path`, the other workers return None.

  Args:
    model: a Keras model (functional, Sequential or subclassed) with `DistributedEmbedding`
      layers, built (trained or called once).
    path: the folder to write: `saved_model/` (a SavedModel with a `serving_default` signature)
      and, for functional and Sequential models, `model.keras`.
    native_ops: True for a served graph of TensorFlow's own ops only: `Embedding` lookups as
      gathers and segment reductions, `IntegerLookup` as a frozen `tf.lookup` table. A process
      without this library loads the SavedModel.
    input_signature: the inputs' specs, a list as for `tf.function` (default: from a functional
      model's inputs; required for a subclassed model).

  Returns:
    `path` on rank 0, None elsewhere.
  """
  layers = _layers_of(model)
  distributed = [l for l in layers if isinstance(l, dist_embedding.DistributedEmbedding)]
  gathered = [layer.get_weights(all_ranks=True) for layer in distributed]
  rank = distributed[0].rank if distributed else 0
  if rank != 0:
    return None
  replacements = [
    (layer, _serving_layer(layer, tables, native_ops))
    for layer, tables in zip(distributed, gathered)
  ]
  if native_ops:
    unsupported = [l.name for l in layers if isinstance(l, embedding_lib.ConcatOneHotEmbedding)]
    if unsupported:
      raise ValueError(
        "export_for_serving: native_ops=True has no TensorFlow-only form of "
        f"ConcatOneHotEmbedding (layers {unsupported}); export with native_ops=False."
      )
    replacements += [
      (layer, _native_lookup_layer(layer))
      for layer in layers
      if isinstance(layer, embedding_lib.IntegerLookup)
    ]
    replacements += [
      (layer, _native_embedding(layer))
      for layer in layers
      if type(layer) is embedding_lib.Embedding and layer.use_custom_kernel  # pylint: disable=unidiomatic-typecheck
    ]
  os.makedirs(path, exist_ok=True)
  signature = _input_signature(model, input_signature)

  with _serving_calls(replacements):

    @tf.function(input_signature=signature)
    def serve(*args):
      outputs = model(*args, training=False) if _accepts_training(model) else model(*args)
      if isinstance(outputs, dict):
        return outputs
      if isinstance(outputs, (list, tuple)):
        return {f"output_{k}": out for k, out in enumerate(outputs)}
      return {"output_0": outputs}

    concrete = serve.get_concrete_function()
    module = _ServingModule(serve, replacements)
    # Variables the serving graph reads that the replacements do not own (dense layers).
    module.model_variables = list(concrete.variables)
    tf.saved_model.save(
      module, os.path.join(path, "saved_model"), signatures={"serving_default": concrete}
    )
  if _is_graph_model(model):
    mapping = {id(layer): r for layer, r in replacements}

    def clone(layer):
      if id(layer) in mapping:
        return mapping[id(layer)]
      return layer.__class__.from_config(layer.get_config())

    served = keras.models.clone_model(model, clone_function=clone)
    for original, copy in zip(model.layers, served.layers):
      if id(original) not in mapping and original.weights:
        copy.set_weights(original.get_weights())
    served.save(os.path.join(path, "model.keras"))
  return path


def _is_graph_model(model):
  """Functional and Sequential models (those clone_model rebuilds from their layer graph)."""
  from keras.src.models import functional  # pylint: disable=import-outside-toplevel

  return isinstance(model, (keras.Sequential, functional.Functional)) and (
    type(model).call is functional.Functional.call or isinstance(model, keras.Sequential)
  )


def _native_embedding(layer):
  """A plain `Embedding` outside any DistributedEmbedding, on TensorFlow's own ops."""
  config = layer.get_config()
  config["use_custom_kernel"] = False
  native = embedding_lib.Embedding.from_config(config)
  native.build()
  native.set_weights(layer.get_weights())
  return native


def _accepts_training(model):
  try:
    return "training" in inspect.signature(model.call).parameters
  except (TypeError, ValueError):
    return False
