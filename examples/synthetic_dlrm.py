"""The main job: a DLRM-style click model trained on synthetic Criteo-like data.

Data (generated locally, deterministic): 13 dense features and 26 categorical features whose
tables have the public Criteo 1TB cardinalities scaled down to the preset's cap, with power-law id
frequencies; a few features are multi-hot with variable length (RaggedTensor). Each id carries a
hidden weight, and the click label is drawn from a logistic model of those weights plus the dense
features, so the data has signal and the evaluation AUC must rise well above 0.5.

Model: bottom MLP on the dense features, the 26 tables in one DistributedEmbedding, DLRM's
pairwise dot-product interaction (concatenated with the embeddings), top MLP. Trained with Keras model.fit (progress bar), then
evaluated; writes summary.json and plot.png (loss and throughput per step) to --out_dir.

  python examples/synthetic_dlrm.py --preset tiny              # one worker
  python examples/synthetic_dlrm.py --preset tiny --workers 2  # two local worker processes
"""

import argparse
import json
import os
import sys
import time

import numpy as np

# Public Criteo 1TB categorical cardinalities (as used by MLPerf DLRM), in feature order.
CRITEO_CARDINALITIES = [
  39884406,
  39043,
  17289,
  7420,
  20263,
  3,
  7120,
  1543,
  63,
  38532951,
  2953546,
  403346,
  10,
  2208,
  11938,
  155,
  4,
  976,
  14,
  39979771,
  25641295,
  39664984,
  585935,
  12972,
  108,
  36,
]
MULTI_HOT = {2: 8, 4: 5, 14: 6, 23: 4}  # feature -> largest number of ids per sample
NUM_DENSE = 13

PRESETS = {
  # cap: largest table rows; width: embedding width; batch: global batch; steps: training steps
  "tiny": dict(cap=20_000, width=16, batch=1024, steps=200, eval_samples=16384),
  "small": dict(cap=200_000, width=32, batch=2048, steps=400, eval_samples=32768),
  "medium": dict(cap=2_000_000, width=64, batch=4096, steps=600, eval_samples=65536),
}


def cardinalities(cap):
  """Criteo's cardinalities capped at `cap`; multi-hot features at cap / 10 (fewer, hotter ids)."""
  return [
    max(2, min(c, cap // 10 if f in MULTI_HOT else cap)) for f, c in enumerate(CRITEO_CARDINALITIES)
  ]


def _hidden_weight(feature, ids):
  """A fixed pseudo-random weight in [-1, 1) per (feature, id), computed, never stored."""
  h = ids.astype(np.uint64) * np.uint64(2654435761) + np.uint64(feature * 40503 + 17)
  h ^= h >> np.uint64(15)
  h *= np.uint64(0x2C1B3C6D)
  h ^= h >> np.uint64(12)
  return (h % np.uint64(1 << 20)).astype(np.float64) / float(1 << 19) - 1.0


def make_data(num_samples, cards, seed):
  """Dense features, per-feature ids (arrays, or (values, lengths) for multi-hot), labels."""
  rng = np.random.default_rng(seed)
  dense = np.log1p(rng.lognormal(0.0, 1.0, size=(num_samples, NUM_DENSE))).astype(np.float32)
  dense_weights = np.linspace(-0.5, 0.5, NUM_DENSE)
  score = dense @ dense_weights
  features = []
  for f, card in enumerate(cards):
    hotness = MULTI_HOT.get(f)
    if hotness:
      lengths = np.minimum(rng.zipf(2.0, size=num_samples), hotness)
      values = (rng.zipf(1.2, size=int(lengths.sum())) - 1) % card
      starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
      score += np.add.reduceat(_hidden_weight(f, values), starts) / lengths
      features.append((values.astype(np.int64), lengths.astype(np.int64)))
    else:
      ids = (rng.zipf(1.2, size=num_samples) - 1) % card
      score += _hidden_weight(f, ids)
      features.append(ids.astype(np.int64)[:, None])
  logits = 0.6 * score - 1.0
  labels = (rng.random(num_samples) < 1.0 / (1.0 + np.exp(-logits))).astype(np.float32)
  return dense, features, labels[:, None]


def slice_rows(features, begin, end):
  """Rows [begin, end) of every feature."""
  out = []
  for feature in features:
    if isinstance(feature, tuple):
      values, lengths = feature
      offsets = np.concatenate([[0], np.cumsum(lengths)])
      out.append((values[offsets[begin] : offsets[end]], lengths[begin:end]))
    else:
      out.append(feature[begin:end])
  return out


class StockEmbeddings:
  """The same tables as stock keras.layers.Embedding + keras.ops pooling (--embeddings stock),
  for comparing throughput; one worker only."""

  def __init__(self, cards, width, initializer):
    import keras  # pylint: disable=import-outside-toplevel

    self.layers = [
      keras.layers.Embedding(c, width, embeddings_initializer=initializer) for c in cards
    ]
    self.plan = "stock keras.layers.Embedding tables, one worker"

  def __call__(self, inputs):
    import keras  # pylint: disable=import-outside-toplevel
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    outputs = []
    for f, (layer, ids) in enumerate(zip(self.layers, inputs)):
      rows = layer(ids)
      if f in MULTI_HOT:  # ragged [batch, None, width] -> mean over each row's ids
        rows = keras.layers.Lambda(lambda r: tf.reduce_mean(r, axis=1))(rows)
      else:
        rows = keras.ops.sum(rows, axis=1)
      outputs.append(rows)
    return outputs


def build_model(cards, width, communicator, data_parallel_threshold, stock=False):
  import keras  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  import distributed_embeddings as de  # pylint: disable=import-outside-toplevel
  from distributed_embeddings import dist_model_parallel as dmp  # pylint: disable=import-outside-toplevel

  dense_in = keras.Input(shape=(NUM_DENSE,), dtype="float32", name="dense")
  cat_in = [
    keras.Input(shape=(None,), ragged=True, dtype="int64", name=f"cat{f}")
    if f in MULTI_HOT
    else keras.Input(shape=(1,), dtype="int64", name=f"cat{f}")
    for f in range(len(cards))
  ]
  bottom = keras.Sequential(
    [keras.layers.Dense(64, activation="relu"), keras.layers.Dense(width, activation="relu")],
    name="bottom_mlp",
  )
  initializer = keras.initializers.RandomUniform(-0.05, 0.05)
  if stock:
    embeddings = StockEmbeddings(cards, width, initializer)
  else:
    embeddings = dmp.DistributedEmbedding(
      [
        de.Embedding(
          c,
          width,
          combiner="sum" if f not in MULTI_HOT else "mean",
          embeddings_initializer=initializer,
        )
        for f, c in enumerate(cards)
      ],
      strategy="balanced",
      data_parallel_threshold=data_parallel_threshold,
      communicator=communicator,
      name="embeddings",
    )
  x = bottom(dense_in)
  pooled = embeddings(cat_in)
  # DLRM interaction: dot products of every pair among the bottom output and the embeddings.
  stacked = keras.ops.stack([x] + pooled, axis=1)
  dots = keras.ops.matmul(stacked, keras.ops.transpose(stacked, [0, 2, 1]))
  n = len(pooled) + 1
  rows, cols = np.triu_indices(n, k=1)
  flat = keras.ops.reshape(dots, [-1, n * n])
  pairs = keras.ops.take(flat, tf.constant(rows * n + cols), axis=1)
  # The embeddings themselves join the interactions, so first-order id effects are learned fast.
  top = keras.layers.Concatenate()([x, pairs] + pooled)
  for units in (128, 64):
    top = keras.layers.Dense(units, activation="relu")(top)
  logit = keras.layers.Dense(1)(top)
  return keras.Model([dense_in] + cat_in, logit), embeddings


def to_inputs(dense, features):
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  cats = [
    tf.RaggedTensor.from_row_lengths(f[0], f[1]) if isinstance(f, tuple) else f for f in features
  ]
  return [dense] + cats


def train(args):
  import keras  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from distributed_embeddings import dist_model_parallel as dmp  # pylint: disable=import-outside-toplevel

  comm = dmp.init_from_env()
  n, rank = comm.world_size, comm.rank
  preset = dict(PRESETS[args.preset])
  if args.steps:
    preset["steps"] = args.steps
  if preset["batch"] % n:
    raise ValueError(f"the global batch {preset['batch']} must divide evenly among {n} workers.")
  keras.utils.set_random_seed(args.seed)
  cards = cardinalities(preset["cap"])
  local_batch = preset["batch"] // n
  num_train = preset["batch"] * preset["steps"]
  dense, features, labels = make_data(num_train + preset["eval_samples"], cards, args.seed)

  # Each worker trains on its slice of every global batch: rows rank*local .. of each batch.
  order = np.arange(num_train).reshape(preset["steps"], n, local_batch)[:, rank].ravel()
  train_dense, train_labels = dense[order], labels[order]
  train_features = [f[order] if not isinstance(f, tuple) else None for f in features]
  for i, f in enumerate(features):  # multi-hot: gather the rows of this worker's slices
    if isinstance(f, tuple):
      offsets = np.concatenate([[0], np.cumsum(f[1])])
      lengths = f[1][order]
      values = np.concatenate([f[0][offsets[r] : offsets[r + 1]] for r in order])
      train_features[i] = (values, lengths)
  eval_rows = slice(
    num_train + rank * preset["eval_samples"] // n,
    num_train + (rank + 1) * preset["eval_samples"] // n,
  )
  eval_inputs = to_inputs(dense[eval_rows], slice_rows(features, eval_rows.start, eval_rows.stop))

  dp_threshold = args.data_parallel_threshold
  if args.embeddings == "stock" and n > 1:
    raise ValueError("--embeddings stock runs on one worker only.")
  model, embeddings = build_model(
    cards, preset["width"], comm, dp_threshold, stock=args.embeddings == "stock"
  )
  if rank == 0:
    print(embeddings.plan, flush=True)
  # The stock baseline is what a plain Keras model would run: Keras's own Adagrad, which
  # updates whole tables. DistributedOptimizer updates only the rows a batch touches.
  optimizer = keras.optimizers.Adagrad(0.1)
  if args.embeddings != "stock":
    optimizer = dmp.DistributedOptimizer(optimizer, comm)
  model.compile(optimizer=optimizer, loss=keras.losses.BinaryCrossentropy(from_logits=True))

  class StepLog(keras.callbacks.Callback):
    def __init__(self):
      super().__init__()
      self.losses, self.seconds, self._start = [], [], None

    def on_train_batch_begin(self, batch, logs=None):
      self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
      self.seconds.append(time.perf_counter() - self._start)
      self.losses.append(float(logs["loss"]))

  log = StepLog()
  dataset = tf.data.Dataset.from_tensor_slices(
    (tuple(to_inputs(train_dense, train_features)), train_labels)
  ).batch(local_batch)
  start = time.perf_counter()
  model.fit(
    dataset,
    epochs=1,
    verbose=1 if rank == 0 else 0,
    callbacks=[dmp.BroadcastGlobalVariablesCallback(0, comm), log],
  )
  elapsed = time.perf_counter() - start

  logits = model.predict(eval_inputs, batch_size=local_batch, verbose=0)
  all_logits = comm.all_gather(tf.constant(logits, tf.float32)).numpy()
  all_labels = comm.all_gather(tf.constant(labels[eval_rows], tf.float32)).numpy()
  auc = keras.metrics.AUC()
  auc.update_state(all_labels, tf.sigmoid(all_logits))
  # Median step time, so tracing and the first steps do not skew throughput.
  steady = float(np.median(log.seconds[len(log.seconds) // 10 :]))
  summary = {
    "preset": args.preset,
    "workers": n,
    "embeddings": args.embeddings,
    "steps": len(log.losses),
    "global_batch": preset["batch"],
    "tables": len(cards),
    "table_rows": cards,
    "width": preset["width"],
    "samples_per_second": preset["batch"] / steady,
    "wall_seconds": elapsed,
    "first_loss": float(np.mean(log.losses[:10])),
    "final_loss": float(np.mean(log.losses[-10:])),
    "eval_auc": float(auc.result()),
    "eval_samples": int(all_labels.shape[0]),
    "click_rate": float(all_labels.mean()),
  }
  if n > 1:
    summary["exchange_bytes_per_step"] = embeddings.exchange_bytes_per_step(local_batch)
  if rank == 0:
    write_outputs(args.out_dir, summary, log.losses, log.seconds, preset["batch"])
    print(
      f"samples/s {summary['samples_per_second']:,.0f}  loss {summary['first_loss']:.4f} -> "
      f"{summary['final_loss']:.4f}  eval AUC {summary['eval_auc']:.4f}",
      flush=True,
    )
    if n > 1:
      wire = summary["exchange_bytes_per_step"]
      print(
        f"all-to-all bytes per step (all workers, fwd+bwd) {wire['all_to_all']:,} vs "
        f"minimum {wire['minimum']:,} ({wire['all_to_all'] / wire['minimum']:.2f}x)",
        flush=True,
      )
  if summary["eval_auc"] < args.min_auc:
    print(
      f"FAILED: evaluation AUC {summary['eval_auc']:.3f} is below {args.min_auc}", file=sys.stderr
    )
    return 1
  return 0


def write_outputs(out_dir, summary, losses, seconds, global_batch):
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "summary.json"), "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=1)
  steps = np.arange(1, len(losses) + 1)
  fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
  top.plot(steps, losses, lw=0.8, label="loss")
  window = max(1, len(losses) // 20)
  top.plot(
    steps[window - 1 :],
    np.convolve(losses, np.ones(window) / window, "valid"),
    lw=2,
    label=f"mean of {window}",
  )
  top.set_ylabel("binary cross-entropy")
  top.legend()
  top.set_title(
    f"synthetic DLRM, preset {summary['preset']}, {summary['workers']} worker(s), "
    f"eval AUC {summary['eval_auc']:.3f}"
  )
  bottom.plot(steps, global_batch / np.maximum(seconds, 1e-9), lw=0.8)
  bottom.set_ylabel("samples / s")
  bottom.set_xlabel("step")
  bottom.set_yscale("log")
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, "plot.png"), dpi=100)
  print(f"wrote {out_dir}/summary.json and {out_dir}/plot.png", flush=True)


def main(argv):
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
  parser.add_argument("--workers", type=int, default=1, help="local worker processes")
  parser.add_argument("--steps", type=int, default=0, help="override the preset's steps")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument(
    "--data_parallel_threshold",
    type=int,
    default=None,
    help="replicate tables smaller than this many elements on every worker",
  )
  parser.add_argument(
    "--embeddings",
    choices=["ours", "stock"],
    default="ours",
    help="'stock': keras.layers.Embedding tables, for throughput comparison",
  )
  # `bazel run` starts in the runfiles tree: write next to the checkout (or in a test's tmpdir).
  base = os.environ.get("BUILD_WORKSPACE_DIRECTORY", os.environ.get("TEST_TMPDIR", os.getcwd()))
  parser.add_argument("--out_dir", default=os.path.join(base, "runs", "dlrm"))
  parser.add_argument(
    "--min_auc", type=float, default=0.6, help="exit non-zero if the evaluation AUC ends below this"
  )
  args = parser.parse_args(argv[1:])
  if args.workers > 1 and "TF_CONFIG" not in os.environ:
    # Re-run this program as N workers through the launcher.
    from distributed_embeddings import launch  # pylint: disable=import-outside-toplevel

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    env.pop("PYTHONSAFEPATH", None)
    return launch.launch(args.workers, [sys.executable, os.path.abspath(__file__)] + argv[1:], env)
  return train(args)


if __name__ == "__main__":
  sys.exit(main(sys.argv))
