"""Train on N, serve on 1: `dmp.export_for_serving`.

A functional model (IntegerLookup keys, every placement of DistributedEmbedding, a weighted
input, a Dense head) trains on 2 workers (threads on logical CPU devices); its export is loaded
in a fresh process (with `native_ops=True`, one where `distributed_embeddings` cannot be
imported) and must predict what the trained model predicted on the same global batch. A
subclassed model exports its SavedModel from an input signature.
"""

import os
import subprocess
import sys
import tempfile
import textwrap

from absl.testing import absltest
from absl.testing import parameterized
import keras
import numpy as np
import tensorflow as tf

import distributed_embeddings as de
from distributed_embeddings import dist_model_parallel as dmp
from distributed_embeddings.python.parallel import communicator as comm_lib
import dist_case
import test_util

comm_lib.configure_logical_devices(4)

TABLES, GLOBAL_BATCH, HOTNESS = dist_case.TABLES, dist_case.GLOBAL_BATCH, dist_case.HOTNESS
KEYS = np.arange(7000, 7000 + TABLES[0][0] - 1)  # table 0's vocabulary, ids 1..rows-1


def _batch(step):
  rng = np.random.default_rng(500 + step)
  x = {"keys": rng.choice(KEYS, size=(GLOBAL_BATCH, HOTNESS[0]))}
  for t in range(1, len(TABLES)):
    x[f"ids_{t}"] = rng.integers(0, TABLES[t][0], size=(GLOBAL_BATCH, HOTNESS[t]))
  x["weights_2"] = rng.random((GLOBAL_BATCH, HOTNESS[2])).astype(np.float32)
  return x, rng.standard_normal((GLOBAL_BATCH, 1)).astype(np.float32)


def _model(communicator):
  inputs = {"keys": keras.Input((HOTNESS[0],), dtype="int64", name="keys")}
  for t in range(1, len(TABLES)):
    inputs[f"ids_{t}"] = keras.Input((HOTNESS[t],), dtype="int64", name=f"ids_{t}")
  inputs["weights_2"] = keras.Input((HOTNESS[2],), dtype="float32", name="weights_2")
  lookup = de.IntegerLookup(TABLES[0][0] - 1, name="lookup")
  lookup(tf.constant(KEYS[:, None]))  # the same vocabulary on every worker
  combiners = ["mean", "sum", "sqrtn", "mean", "sum"]
  layer = dmp.DistributedEmbedding(
    [de.Embedding(r, w, combiner=c) for (r, w), c in zip(TABLES, combiners)],
    communicator=communicator,
    **dist_case.MODE,
  )
  ids = [lookup(inputs["keys"])] + [inputs[f"ids_{t}"] for t in range(1, len(TABLES))]
  weights = [None, None, inputs["weights_2"], None, None]
  pooled = keras.layers.Concatenate()(layer(ids, weights=weights))
  out = keras.layers.Dense(1, kernel_initializer=keras.initializers.Constant(0.05))(pooled)
  model = keras.Model(inputs, out)
  layer.set_weights(dist_case.initial_tables())
  return model


def _train_and_export(comm, path, native_ops):
  """Trains 3 SGD steps on this worker's share, exports; returns this worker's predictions of
  a fresh batch after training."""
  model = _model(comm)
  n, rank = comm.world_size, comm.rank
  local = slice(rank * GLOBAL_BATCH // n, (rank + 1) * GLOBAL_BATCH // n)
  optimizer = dmp.DistributedOptimizer(keras.optimizers.SGD(0.1), comm)
  for step in range(3):
    x, y = _batch(step)
    with tf.GradientTape() as tape:
      pred = model({k: tf.constant(v[local]) for k, v in x.items()}, training=True)
      loss = tf.reduce_mean((pred - y[local]) ** 2)
    variables = model.trainable_variables
    grads = dmp.DistributedGradientTape(tape, comm).gradient(loss, variables)
    optimizer.apply_gradients(zip(grads, variables))
  x, _ = _batch(99)
  pred = model({k: tf.constant(v[local]) for k, v in x.items()}, training=False).numpy()
  written = dmp.export_for_serving(model, path, native_ops=native_ops)
  return pred, written, model.get_layer("lookup").get_vocabulary()


_SERVE = textwrap.dedent(
  """
  import sys
  if sys.argv[3] == "1":
    sys.modules["distributed_embeddings"] = None  # a process without the library
  else:
    import distributed_embeddings  # registers our ops and Keras classes
  import numpy as np
  import tensorflow as tf
  x = dict(np.load(sys.argv[2]))
  serve = tf.saved_model.load(sys.argv[1] + "/saved_model").signatures["serving_default"]
  out = {"saved_model": serve(**{k: tf.constant(v) for k, v in x.items()})["output_0"].numpy()}
  ops = {n.op for f in serve.graph.as_graph_def().library.function for n in f.node_def}
  ops |= {n.op for n in serve.graph.as_graph_def().node}
  out["our_ops"] = np.array(sorted(o for o in ops if o.startswith("De")) or ["none"])
  if sys.argv[3] == "0":
    import keras
    model = keras.models.load_model(sys.argv[1] + "/model.keras")
    out["keras"] = model.predict(x, verbose=0)
  np.savez(sys.argv[4], **out)
  """
)


class ServingTest(test_util.TestCase):
  @parameterized.parameters(False, True)
  def test_trained_on_two_workers_served_in_a_fresh_process(self, native_ops):
    path = os.path.join(tempfile.mkdtemp(dir=self.create_tempdir().full_path), "export")
    results = comm_lib.run_in_threads(2, lambda comm: _train_and_export(comm, path, native_ops))
    self.assertEqual(results[0][1], path)
    self.assertIsNone(results[1][1])
    trained = np.concatenate([pred for pred, _, _ in results])
    x, _ = _batch(99)
    inputs = os.path.join(path, "inputs.npz")
    np.savez(inputs, **x)
    script = os.path.join(path, "serve.py")
    with open(script, "w", encoding="utf-8") as f:
      f.write(_SERVE)
    served = os.path.join(path, "served.npz")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    subprocess.run(
      [sys.executable, script, path, inputs, "1" if native_ops else "0", served],
      env=env,
      check=True,
    )
    got = np.load(served)
    self.assertAllClose(trained, got["saved_model"], rtol=1e-5, atol=1e-6)
    if native_ops:
      self.assertEqual(list(got["our_ops"]), ["none"])
    else:
      self.assertIn("DeResourcePooledEmbeddingLookup", list(got["our_ops"]))
      self.assertAllClose(trained, got["keras"], rtol=1e-5, atol=1e-6)

  def test_vocabularies_survive_export(self):
    path = os.path.join(self.create_tempdir().full_path, "export")
    ((_, _, vocabulary),) = comm_lib.run_in_threads(
      1, lambda comm: _train_and_export(comm, path, True)
    )
    served = keras.models.load_model(os.path.join(path, "model.keras"))
    self.assertEqual(served.get_layer("lookup").vocabulary, [int(k) for k in vocabulary])
    self.assertEqual(vocabulary[0], -1)

  def test_subclassed_model_needs_and_uses_an_input_signature(self):
    class Model(keras.Model):
      def __init__(self):
        super().__init__()
        self.embedding = dmp.DistributedEmbedding(
          [de.Embedding(20, 3, combiner="sum"), de.Embedding(10, 3, combiner="mean")]
        )
        self.head = keras.layers.Dense(1)

      def call(self, inputs):
        return self.head(tf.concat(self.embedding(list(inputs)), axis=1))

    model = Model()
    x = [tf.constant([[1, 2], [3, 19]]), tf.ragged.constant([[4], [5, 6, 9]], dtype=tf.int64)]
    want = model(x).numpy()
    path = self.create_tempdir().full_path
    with self.assertRaisesRegex(ValueError, "subclassed model needs 'input_signature'"):
      dmp.export_for_serving(model, path)
    signature = [
      [
        tf.TensorSpec([None, 2], tf.int32, name="ids"),
        tf.RaggedTensorSpec([None, None], tf.int64, ragged_rank=1, row_splits_dtype=tf.int64),
      ]
    ]
    dmp.export_for_serving(model, path, native_ops=True, input_signature=signature)
    self.assertFalse(os.path.exists(os.path.join(path, "model.keras")))
    loaded = tf.saved_model.load(os.path.join(path, "saved_model"))
    self.assertAllClose(want, loaded.serve(x)["output_0"])
    # The trained model is untouched: it still runs its own layer.
    self.assertAllClose(want, model(x))

  def test_native_ops_refuse_what_has_no_tensorflow_form(self):
    ids = keras.Input((2,), dtype="int64")
    model = keras.Model(ids, de.ConcatOneHotEmbedding([5, 5], 3)(ids))
    with self.assertRaisesRegex(ValueError, "no TensorFlow-only form of ConcatOneHotEmbedding"):
      dmp.export_for_serving(model, self.create_tempdir().full_path, native_ops=True)


if __name__ == "__main__":
  absltest.main()
