"""Per-worker memory of the reference suite's 41-table case (2.4 GiB of tables), ours and its floor.

Two measurements, each in fresh processes, peak resident memory sampled every millisecond:

  floor  What the reference test's own steps need in one worker if the library under test held
         no memory at all: the plain Keras model (every table), `ref_model.get_weights()`, a
         second list of the same bytes standing in for `dist_embeddings.get_weights(True)`, and
         `tf.test.TestCase.assertAllClose` over each pair of tables, as the test compares them.
         N workers on one host need N times this.
  ours   N workers (the launcher) training a subclassed model whose DistributedEmbedding holds
         the 41 tables with the test's placement thresholds (data-parallel, table-wise, column
         and row slices): the shards' bytes, the peak during training steps (no table-sized
         buffer may appear: replicated sparse gradients are gathered sparse), and the peak during
         `get_weights(all_ranks=True)`, which must add only the tables it returns.

  .venv/bin/python tools/benchmarks/large_tables_memory.py --workers 2 4
  .venv/bin/python tools/benchmarks/large_tables_memory.py --quick     # smoke test, tables / 1000

The report goes to runs/bench/large_tables_memory.json (`--json`; with --quick, none outside a test).
"""

import argparse
import json
import os
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_report  # noqa: E402  pylint: disable=wrong-import-position

# The reference's `large_testcase_sizes`: [rows, width] of its 41 tables.
REFERENCE_TABLES = [
  [2, 8],
  [2, 16],
  [10, 8],
  [10, 16],
  [10, 16],
  [10, 16],
  [10, 16],
  [10, 16],
  [10, 32],
  [10, 128],
  [10, 128],
  [10, 128],
  [10, 128],
  [10, 1024],
  [100, 16],
  [100, 32],
  [100, 32],
  [100, 32],
  [100, 32],
  [100, 128],
  [100, 128],
  [1000, 16],
  [1000, 16],
  [1000, 48],
  [1000, 128],
  [1000, 128],
  [1000, 384],
  [10000, 64],
  [10000, 64],
  [10000, 2048],
  [100000, 32],
  [100000, 64],
  [100000, 64],
  [100000, 64],
  [100000, 128],
  [1000000, 96],
  [1000000, 128],
  [1000000, 128],
  [9999999, 8],
  [10000000, 8],
  [10000001, 8],
]
# The reference test's placement for these tables.
THRESHOLDS = dict(
  strategy="memory_balanced",
  data_parallel_threshold=10000,
  column_slice_threshold=1000000,
  row_slice_threshold=10000000,
)
GIB = 2**30


class PeakSampler:
  """Samples this process's resident set size; `phase()` starts a new peak."""

  def __init__(self):
    self.peak = self.now()
    threading.Thread(target=self._run, daemon=True).start()

  @staticmethod
  def now():
    with open("/proc/self/status") as status:
      for line in status:
        if line.startswith("VmRSS"):
          return int(line.split()[1]) * 1024 / GIB
    return 0.0

  def _run(self):
    while True:
      self.peak = max(self.peak, self.now())
      time.sleep(0.001)

  def phase(self):
    time.sleep(0.01)
    peak, self.peak = self.peak, self.now()
    return peak


def _tables(scale):
  return [[max(1, rows // scale), width] for rows, width in REFERENCE_TABLES]


def floor_worker(scale):
  import numpy as np  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  import keras  # pylint: disable=import-outside-toplevel

  sampler = PeakSampler()
  tables = _tables(scale)
  layers = [keras.layers.Embedding(rows, width) for rows, width in tables]
  for layer, (rows, _) in zip(layers, tables):
    layer(tf.constant([0, rows - 1]))
  ref_weights = [layer.get_weights()[0] for layer in layers]
  test_weights = [np.copy(w) for w in ref_weights]
  checker = tf.test.TestCase()
  for ref_w, test_w in zip(ref_weights, test_weights):
    checker.assertAllClose(
      tf.convert_to_tensor(ref_w), tf.convert_to_tensor(test_w), rtol=1e-5, atol=1e-5
    )
  return {"tables_gib": sum(r * w for r, w in tables) * 4 / GIB, "peak_gib": sampler.phase()}


def ours_worker(scale, steps):
  import numpy as np  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  import keras  # pylint: disable=import-outside-toplevel
  from distributed_embeddings import dist_model_parallel as dmp  # pylint: disable=import-outside-toplevel

  comm = dmp.init_from_env()
  sampler = PeakSampler()
  tables = _tables(scale)
  thresholds = dict(THRESHOLDS)
  for key in ("data_parallel_threshold", "column_slice_threshold", "row_slice_threshold"):
    thresholds[key] = max(1, thresholds[key] // scale)

  class Model(keras.Model):
    def __init__(self):
      super().__init__()
      self.embedding = dmp.DistributedEmbedding(
        [keras.layers.Embedding(rows, width) for rows, width in tables], **thresholds
      )
      self.dense = keras.layers.Dense(5)

    def call(self, ids):
      return self.dense(tf.concat(self.embedding(ids), 1))

  model = Model()
  optimizer = dmp.DistributedOptimizer(keras.optimizers.SGD(0.1))
  rng = np.random.default_rng(comm.rank)
  batch = 24 // comm.world_size
  batches = [
    [tf.constant(rng.integers(0, rows, batch)) for rows, _ in tables] for _ in range(steps)
  ]
  model(batches[0])
  base = sampler.now()
  built = sampler.phase()
  shard_bytes = sum(
    int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in model.embedding.table_variables
  )

  @tf.function
  def step(ids):
    with tf.GradientTape() as tape:
      loss = tf.reduce_sum(tf.square(model(ids)))
    grads = dmp.DistributedGradientTape(tape).gradient(loss, model.trainable_variables)
    optimizer.apply_gradients(zip(grads, model.trainable_variables))
    return loss

  for ids in batches:
    step(ids).numpy()
  trained = sampler.phase()
  before_weights = sampler.now()
  weights = model.embedding.get_weights(all_ranks=True)
  returned = sum(w.nbytes for w in weights) / GIB
  gathered = sampler.phase()
  return {
    "rank": comm.rank,
    "shards_gib": shard_bytes / GIB,
    "rss_after_build_gib": base,
    "peak_build_gib": built,
    "peak_train_gib": trained,
    "train_above_build_gib": trained - base,
    "weights_returned_gib": returned,
    "get_weights_above_returned_gib": gathered - before_weights - returned,
  }


def _run(args, workers, scale, steps):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  env.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
  me = [os.path.abspath(__file__), "--scale", str(scale), "--steps", str(steps)]
  if workers == 0:
    cmd = [sys.executable] + me + ["--role", "floor"]
  else:
    cmd = (
      [sys.executable, "-m", "distributed_embeddings.launch", "-n", str(workers)]
      + me
      + ["--role", "ours"]
    )
  out = subprocess.run(
    cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False
  )
  results = [
    json.loads(line.split("RESULT ", 1)[1])
    for line in out.stdout.splitlines()
    if "RESULT {" in line
  ]
  if out.returncode != 0 or not results:
    sys.stdout.write(out.stdout[-4000:])
    raise SystemExit(f"{' '.join(cmd)} failed with code {out.returncode}")
  return results


def main(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workers", type=int, nargs="+", default=[2], help="worker counts to run")
  parser.add_argument("--scale", type=int, default=1, help="divide every table's rows by this")
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--role", choices=["floor", "ours"], help=argparse.SUPPRESS)
  parser.add_argument("--quick", action="store_true", help="tables / 1000, for smoke tests")
  parser.add_argument(
    "--json", help="the report's path (default runs/bench/large_tables_memory.json)"
  )
  args = parser.parse_args(argv)
  if args.role == "floor":
    print("RESULT " + json.dumps(floor_worker(args.scale)), flush=True)
    return
  if args.role == "ours":
    print("RESULT " + json.dumps(ours_worker(args.scale, args.steps)), flush=True)
    return
  if args.quick:
    args.scale, args.workers, args.steps = 1000, [1], 2
  if args.json is None:
    args.json = bench_report.default_path("large_tables_memory", args.quick)
  with open("/proc/meminfo") as meminfo:
    host = int(meminfo.readline().split()[1]) * 1024 / GIB
  floor = _run(args, 0, args.scale, args.steps)[0]
  print(f"host memory {host:.1f} GiB; tables {floor['tables_gib']:.2f} GiB (rows / {args.scale})")
  print(f"reference test's floor, one worker, library holding nothing: {floor['peak_gib']:.2f} GiB")
  rows = []
  for workers in args.workers:
    ours = sorted(_run(args, workers, args.scale, args.steps), key=lambda r: r["rank"])
    print(
      f"{workers} workers: rank | shards GiB | RSS after build | peak in training | above build |"
      " get_weights returned | get_weights overhead"
    )
    for r in ours:
      print(
        f"{r['rank']} | {r['shards_gib']:.2f} | {r['rss_after_build_gib']:.2f} | "
        f"{r['peak_train_gib']:.2f} | {r['train_above_build_gib']:+.2f} | "
        f"{r['weights_returned_gib']:.2f} | {r['get_weights_above_returned_gib']:+.2f}"
      )
    rows.append({"workers": workers, "ranks": ours})
  if args.json:
    bench_report.write(
      args.json,
      "large_tables_memory",
      bench_report.command(__file__, argv),
      rows,
      setup={"scale": args.scale, "steps": args.steps, "host_gib": host},
      floor=floor,
    )


if __name__ == "__main__":
  main(sys.argv[1:])
