"""Optimizer step benchmark: training step time of a model that is mostly embedding tables.

Eight tables of 200k x 32 (one-hot ids, batch 2048) feed a Dense head; `model.fit` runs the step.
Per optimizer, the same model is timed with stock `keras.layers.Embedding` tables and Keras's
optimizer, and with our tables in one `DistributedEmbedding` and `DistributedOptimizer` (which
updates only the touched rows for Adagrad, and for Adam with `lazy_sparse_updates=True`). Keras 3
applies Adagrad and Adam with whole-table operations even for sparse gradients, so at this size
the optimizer, not the lookup, is most of a stock step.

  .venv/bin/python tools/benchmarks/optimizer_step_benchmark.py
  .venv/bin/python tools/benchmarks/optimizer_step_benchmark.py --quick    # smoke test

The report goes to runs/bench/optimizer_step.json (`--json`; with --quick, none outside a test).
"""

import argparse
import statistics
import sys
import time

import keras
import numpy as np

import distributed_embeddings as de
from distributed_embeddings import dist_model_parallel as dmp

import bench_report


def build(kind, optimizer_name, tables, rows, width, lazy):
  inputs = [keras.Input((1,), dtype="int64") for _ in range(tables)]
  if kind == "stock":
    outputs = [keras.ops.sum(keras.layers.Embedding(rows, width)(x), axis=1) for x in inputs]
  else:
    outputs = dmp.DistributedEmbedding(
      [de.Embedding(rows, width, combiner="sum") for _ in range(tables)]
    )(inputs)
  model = keras.Model(inputs, keras.layers.Dense(1)(keras.layers.Concatenate()(outputs)))
  optimizer = getattr(keras.optimizers, optimizer_name)(0.01)
  if kind != "stock":
    optimizer = dmp.DistributedOptimizer(optimizer, lazy_sparse_updates=lazy)
  model.compile(optimizer=optimizer, loss="mse")
  return model


def step_ms(model, x, y, batch, steps, repeats):
  """Median over `repeats` epochs of `steps` steps, after one warm-up epoch."""
  model.fit(x, y, batch_size=batch, epochs=1, verbose=0)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    model.fit(x, y, batch_size=batch, epochs=1, verbose=0)
    times.append((time.perf_counter() - start) / steps * 1e3)
  return statistics.median(times)


def main(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="tiny sizes, for smoke tests")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--json", help="the report's path (default runs/bench/optimizer_step.json)")
  args = parser.parse_args(argv)
  if args.json is None:
    args.json = bench_report.default_path("optimizer_step", args.quick)
  tables, rows, width, batch, steps = (
    (2, 1000, 8, 64, 2) if args.quick else (8, 200_000, 32, 2048, 20)
  )
  repeats = 1 if args.quick else args.repeats
  rng = np.random.default_rng(0)
  x = [rng.integers(0, rows, (batch * steps, 1)) for _ in range(tables)]
  y = rng.random((batch * steps, 1)).astype("float32")
  configs = [("SGD", False), ("Adagrad", False), ("Adam", False), ("Adam", True)]
  print(f"{tables} tables of {rows} x {width}, batch {batch}, median of {repeats} x {steps} steps")
  print("| optimizer | stock Keras ms/step | ours ms/step | ours faster |")
  print("|---|---|---|---|")
  results = []
  for name, lazy in configs:
    stock = step_ms(build("stock", name, tables, rows, width, False), x, y, batch, steps, repeats)
    ours = step_ms(build("ours", name, tables, rows, width, lazy), x, y, batch, steps, repeats)
    label = name + (" (lazy_sparse_updates)" if lazy else "")
    print(f"| {label} | {stock:.1f} | {ours:.1f} | {stock / ours:.2f}x |", flush=True)
    results.append(
      {
        "optimizer": name,
        "lazy_sparse_updates": lazy,
        "stock_ms": stock,
        "ours_ms": ours,
        "stock_over_ours": stock / ours,
      }
    )
  if args.json:
    setup = {"tables": tables, "rows": rows, "width": width, "batch": batch, "steps": steps}
    setup["repeats"] = repeats
    bench_report.write(
      args.json,
      "optimizer_step",
      bench_report.command(__file__, argv),
      results,
      setup=setup,
    )


if __name__ == "__main__":
  main(sys.argv[1:])
