"""Copy-on-read benchmark: lookup time on a variable before and after a sparse update.

After its first sparse update (scatter, sparse optimizer apply) TensorFlow puts a resource
variable in copy-on-read mode: from then on every dense read (ReadVariableOp, what
`tf.convert_to_tensor(variable)` and Keras' `ops.take(variable, ...)` do) copies the whole table.
Our lookup reads the variable through its handle, so its step time must not change. Each path is
timed on a fresh variable, then the variable gets one `scatter_sub`, then it is timed again.

  .venv/bin/python tools/benchmarks/copy_on_read_benchmark.py            # V=1M, width 64
  .venv/bin/python tools/benchmarks/copy_on_read_benchmark.py --quick    # smoke test

The report goes to runs/bench/copy_on_read.json (`--json`; with --quick, none outside a test).
"""

import argparse
import statistics
import sys
import time

import numpy as np
import tensorflow as tf

import distributed_embeddings as de

import bench_report


def _paths():
  """{name: (description, lookup(var, ids))}."""
  return {
    "ours": (
      "ours (reads through the resource handle)",
      lambda var, ids: de.embedding_lookup(var, ids, combiner="sum"),
    ),
    "tf_resource_gather": (
      "`tf.nn.embedding_lookup` + `reduce_sum` (ResourceGather)",
      lambda var, ids: tf.reduce_sum(tf.nn.embedding_lookup(var, ids), axis=1),
    ),
    "dense_read_gather": (
      "dense read + `tf.gather` + `reduce_sum` (Keras `ops.take` on a variable)",
      lambda var, ids: tf.reduce_sum(tf.gather(tf.convert_to_tensor(var), ids), axis=1),
    ),
  }


def _median_ms(fn, batches, iters, repeats):
  fn(batches[0]).numpy()
  samples = []
  for _ in range(repeats):
    start = time.perf_counter()
    for i in range(iters):
      out = fn(batches[i % len(batches)])
    out.numpy()
    samples.append((time.perf_counter() - start) / iters * 1e3)
  return statistics.median(samples)


def main(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--vocab", type=int, default=1_000_000)
  parser.add_argument("--width", type=int, default=64)
  parser.add_argument("--batch", type=int, default=8192)
  parser.add_argument("--hotness", type=int, default=10)
  parser.add_argument("--iters", type=int, default=20)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--quick", action="store_true", help="small sizes, for smoke tests")
  parser.add_argument("--json", help="the report's path (default runs/bench/copy_on_read.json)")
  args = parser.parse_args(argv)
  if args.quick:
    args.vocab, args.batch, args.iters, args.repeats = 1000, 64, 2, 2
  if args.json is None:
    args.json = bench_report.default_path("copy_on_read", args.quick)

  rng = np.random.default_rng(0)
  table = rng.standard_normal((args.vocab, args.width)).astype(np.float32)
  batches = [
    tf.constant(rng.integers(0, args.vocab, size=(args.batch, args.hotness))) for _ in range(5)
  ]
  print(
    f"V={args.vocab} width={args.width} ({table.nbytes / 2**20:.0f} MiB) "
    f"batch={args.batch} hotness={args.hotness}; median of {args.repeats} x {args.iters}\n"
  )
  print("| path | before sparse update (ms) | after (ms) | after / before |")
  print("|---|---|---|---|")
  rows = []
  for name, (description, lookup) in _paths().items():
    var = tf.Variable(table)
    step = tf.function(lambda ids, var=var, lookup=lookup: lookup(var, ids))
    before = _median_ms(step, batches, args.iters, args.repeats)
    var.scatter_sub(tf.IndexedSlices(tf.ones([1, args.width]), tf.constant([0])))
    after = _median_ms(step, batches, args.iters, args.repeats)
    print(f"| {description} | {before:.2f} | {after:.2f} | {after / before:.2f} |", flush=True)
    expected = table[batches[0].numpy()].sum(1)
    expected[(batches[0].numpy() == 0).any(1)] = np.nan  # row 0 changed; skip those bags
    got = step(batches[0]).numpy()
    keep = ~np.isnan(expected).any(1)
    np.testing.assert_allclose(got[keep], expected[keep], rtol=1e-4, atol=1e-4)
    rows.append(
      {
        "path": name,
        "description": description,
        "before_ms": before,
        "after_ms": after,
        "after_over_before": after / before,
      }
    )
  if args.json:
    setup = {
      k: getattr(args, k) for k in ("vocab", "width", "batch", "hotness", "iters", "repeats")
    }
    setup["table_mib"] = table.nbytes / 2**20
    bench_report.write(
      args.json, "copy_on_read", bench_report.command(__file__, argv), rows, setup=setup
    )
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
