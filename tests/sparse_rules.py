"""The sparse optimizer rules of embedding/kernels/sparse_update.h in float64, the raw update ops
called the same way, and random tables with state, shared by the sparse update tests."""

import numpy as np
import tensorflow as tf

from distributed_embeddings.python.ops import embedding_lookup_ops

_ops = embedding_lookup_ops._ops  # pylint: disable=protected-access

LR, EPS, BETA1, BETA2 = 0.05, 1e-7, 0.9, 0.999


def reference(rule, table, slots, indices, grad, step=1):
  """The rules of embedding/kernels/sparse_update.h in float64, repeated indices summed first."""
  w = table.astype(np.float64)
  slots = [s.astype(np.float64) for s in slots]
  summed = {}
  for j, i in enumerate(indices):
    summed[int(i)] = summed.get(int(i), 0) + grad[j].astype(np.float64)
  for i, g in summed.items():
    if rule == "sgd":
      w[i] -= LR * g
    elif rule == "adagrad":
      slots[0][i] += g * g
      w[i] -= LR * g / np.sqrt(slots[0][i] + EPS)
    elif rule == "rowwise_adagrad":
      slots[0][i] += np.mean(g * g)
      w[i] -= LR * g / np.sqrt(slots[0][i] + EPS)
    else:
      rate = LR * np.sqrt(1 - BETA2**step) / (1 - BETA1**step)
      slots[0][i] = BETA1 * slots[0][i] + (1 - BETA1) * g
      slots[1][i] = BETA2 * slots[1][i] + (1 - BETA2) * g * g
      w[i] -= rate * slots[0][i] / (np.sqrt(slots[1][i]) + EPS)
  return w, slots


def apply_raw(rule, variables, indices, grad, step=1):
  dtype = variables[0].dtype
  handles = [v.handle for v in variables]
  c = lambda x: tf.constant(x, dtype)  # pylint: disable=unnecessary-lambda-assignment
  if rule == "sgd":
    return _ops.de_sparse_apply_sgd(*handles, indices, grad, c(LR))
  if rule == "adagrad":
    return _ops.de_sparse_apply_adagrad(*handles, indices, grad, c(LR), c(EPS))
  if rule == "rowwise_adagrad":
    return _ops.de_sparse_apply_rowwise_adagrad(*handles, indices, grad, c(LR), c(EPS))
  rate = LR * np.sqrt(1 - BETA2**step) / (1 - BETA1**step)
  return _ops.de_sparse_apply_lazy_adam(
    *handles, indices, grad, c(rate), c(1 - BETA1), c(1 - BETA2), c(EPS)
  )


def make_case(rule, rows, width, n, dtype, seed, distinct=False):
  rng = np.random.default_rng(seed)
  table = rng.uniform(-1, 1, (rows, width)).astype(dtype)
  slot_shape = (rows, 1) if rule == "rowwise_adagrad" else (rows, width)
  count = {"sgd": 0, "lazy_adam": 2}.get(rule, 1)
  slots = [rng.uniform(0.05, 1, slot_shape).astype(dtype) for _ in range(count)]
  if rule == "lazy_adam":
    slots[0] = rng.uniform(-1, 1, slot_shape).astype(dtype)
  indices = rng.permutation(rows)[:n] if distinct else rng.integers(0, rows, n)
  grad = rng.uniform(-1, 1, (n, width)).astype(dtype)
  return table, slots, indices, grad


RULES = ("sgd", "adagrad", "rowwise_adagrad", "lazy_adam")
