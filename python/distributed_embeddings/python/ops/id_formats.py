"""Ids in their three formats (dense, `tf.RaggedTensor`, `tf.SparseTensor`) for the layers.

`embedding_lookup` takes any of them; the model-parallel layer moves ids between workers as CSR
(flat values plus per-row lengths), so it needs to know each input's batch, to check its
structure without raising (every worker has to learn of a malformed input at the same time), and
to turn sparse ids into CSR with the library's own validation.
"""

import tensorflow as tf

from distributed_embeddings.python.ops import embedding_lookup_ops

# The largest batch (dense_shape[0]) a SparseTensor may declare: its row_splits are materialized.
MAX_SPARSE_ROWS = 2**31 - 1


def batch_size(ids):
  """Rows (bags) of dense, ragged or sparse ids, as an int64 scalar."""
  if isinstance(ids, tf.RaggedTensor):
    return ids.nrows(out_type=tf.int64)
  if isinstance(ids, tf.SparseTensor):
    return tf.cast(ids.dense_shape[0], tf.int64)
  return tf.shape(ids, out_type=tf.int64)[0]


def flat_ids(ids):
  """Every id of `ids`, flat: a dense tensor's elements, a ragged or sparse tensor's values."""
  if isinstance(ids, (tf.RaggedTensor, tf.SparseTensor)):
    return tf.reshape(ids.values if isinstance(ids, tf.SparseTensor) else ids.flat_values, [-1])
  return tf.reshape(ids, [-1])


def is_bag_batch(ids):
  """2-D dense or ragged ids: one bag per row, so batches concatenate along axis 0."""
  if isinstance(ids, tf.RaggedTensor):
    return ids.ragged_rank == 1 and ids.shape.rank == 2
  return isinstance(ids, tf.Tensor) and ids.shape.rank == 2


def concat_bags(batches):
  """One batch of bags from several: dense batches of one hotness stay dense, else ragged."""
  dtype = tf.int64 if any(b.dtype == tf.int64 for b in batches) else batches[0].dtype
  batches = [tf.cast(b, dtype) if b.dtype != dtype else b for b in batches]
  if (
    all(isinstance(b, tf.Tensor) for b in batches)
    and len({b.shape[1] for b in batches}) == 1
    and batches[0].shape[1] is not None
  ):
    return tf.concat(batches, axis=0)
  ragged = [
    b.with_row_splits_dtype(tf.int64)
    if isinstance(b, tf.RaggedTensor)
    else tf.RaggedTensor.from_tensor(b, row_splits_dtype=tf.int64)
    for b in batches
  ]
  return tf.concat(ragged, axis=0)


def add_to_ids(ids, delta):
  """`ids` (dense, ragged or sparse) with `delta` added to every id."""
  if isinstance(ids, tf.RaggedTensor):
    return ids.with_values(ids.values + tf.cast(delta, ids.dtype))
  if isinstance(ids, tf.SparseTensor):
    return tf.SparseTensor(ids.indices, ids.values + tf.cast(delta, ids.dtype), ids.dense_shape)
  return ids + tf.cast(delta, ids.dtype)


def structure_ok(ids):
  """A bool scalar: whether ragged or sparse `ids` are well formed (dense ids always are).

  Ragged: row_splits start at 0, never decrease and end at the number of values. Sparse (2-D):
  dense_shape is non-negative with at most MAX_SPARSE_ROWS rows, and the indices lie inside it
  in canonical row-major order, each position once. Nothing raises, so every worker can be told
  about a malformed input before any of them fails.
  """
  if isinstance(ids, tf.RaggedTensor):
    splits = ids.row_splits
    # Read through a padded copy: row_splits built without validation may even be empty.
    ends = tf.concat([[-1], splits, [-1]], 0)
    size = tf.size(splits)
    return tf.logical_and(
      tf.logical_and(
        tf.equal(ends[1], 0), tf.equal(ends[size], tf.shape(ids.values, out_type=splits.dtype)[0])
      ),
      tf.logical_and(size > 0, tf.reduce_all(splits[1:] >= splits[:-1])),
    )
  if isinstance(ids, tf.SparseTensor):
    shape = ids.dense_shape
    rows, cols = ids.indices[:, 0], ids.indices[:, 1]
    in_shape = tf.logical_and(
      tf.reduce_all(tf.logical_and(rows >= 0, rows < shape[0])),
      tf.reduce_all(tf.logical_and(cols >= 0, cols < shape[1])),
    )
    ordered = tf.reduce_all(
      tf.logical_or(
        rows[1:] > rows[:-1], tf.logical_and(tf.equal(rows[1:], rows[:-1]), cols[1:] > cols[:-1])
      )
    )
    sane_shape = tf.logical_and(tf.reduce_all(shape >= 0), shape[0] <= MAX_SPARSE_ROWS)
    return tf.logical_and(sane_shape, tf.logical_and(in_shape, ordered))
  return tf.constant(True)


def weights_match(ids, weights):
  """A bool scalar: whether per-id `weights` have the structure of `ids` (the same shape when
  dense, row_splits when ragged, indices when sparse). Nothing raises."""
  if isinstance(ids, tf.RaggedTensor):
    return embedding_lookup_ops.same_values(ids.row_splits, weights.row_splits)
  if isinstance(ids, tf.SparseTensor):
    return embedding_lookup_ops.same_values(ids.indices, weights.indices)
  return embedding_lookup_ops.same_values(tf.shape(ids), tf.shape(weights))


def to_ragged(ids):
  """2-D ragged or sparse ids as a RaggedTensor with int64 row_splits (the CSR form). Sparse ids
  are validated by the library's own op (bounds and canonical order of the indices)."""
  if isinstance(ids, tf.SparseTensor):
    row_splits = embedding_lookup_ops.sparse_row_splits(ids.indices, ids.dense_shape)
    return tf.RaggedTensor.from_row_splits(ids.values, row_splits, validate=False)
  return ids.with_row_splits_dtype(tf.int64)
