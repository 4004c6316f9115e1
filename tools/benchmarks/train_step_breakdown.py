"""Where our training step's time goes: the step cut into its parts, timed in one process.

For SGD at one width (the training-step benchmark's table, batch and ids), four tf.functions with
the batch as arguments, timed in interleaved repeats: an empty step (TF's cost per call), the
forward lookup, forward + backward, the whole step (the backward fused with the update), and the
whole step in two passes (DE_FUSED_LOOKUP_UPDATES=0: the backward writes the unique gradient,
the update reads it back). Differences give each part's cost.

  .venv/bin/python tools/benchmarks/train_step_breakdown.py [--width 64] [--hotness 1,10]
  .venv/bin/python tools/benchmarks/train_step_breakdown.py --quick    # smoke test
"""

import argparse
import os
import statistics
import sys
import time

import keras
import numpy as np
import tensorflow as tf

import distributed_embeddings as de
from distributed_embeddings import dist_model_parallel as dmp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_step_data as data  # noqa: E402  pylint: disable=wrong-import-position

SIGNATURE = [tf.TensorSpec([None], tf.int64), tf.TensorSpec([None], tf.int64)]


def parts(var, optimizer):
  """name -> tf.function(values, row_splits) for each cut of the step."""

  def forward(values, splits):
    ids = tf.RaggedTensor.from_row_splits(values, splits, validate=False)
    return de.embedding_lookup(var, ids, combiner="sum")

  def empty(values, splits):
    del splits
    return tf.cast(values[0], tf.float32)

  def forward_only(values, splits):
    return tf.reduce_sum(forward(values, splits)[:1])

  def forward_backward(values, splits):
    with tf.GradientTape() as tape:
      y = forward(values, splits)
      loss = tf.reduce_sum(y * y)
    grad = tape.gradient(loss, [var])[0]
    return grad.values[0, 0] + tf.cast(grad.indices[0], tf.float32)

  def whole_step(values, splits):
    with tf.GradientTape() as tape:
      y = forward(values, splits)
      loss = tf.reduce_sum(y * y)
    optimizer.apply(tape.gradient(loss, [var]), [var])
    return loss

  functions = {
    "empty step": empty,
    "forward": forward_only,
    "forward+backward": forward_backward,
    "whole SGD step": whole_step,
    "two-pass SGD step": whole_step,
  }
  traced = {name: tf.function(f, input_signature=SIGNATURE) for name, f in functions.items()}
  # The optimizer reads the switch when the step is traced.
  os.environ["DE_FUSED_LOOKUP_UPDATES"] = "0"
  traced["two-pass SGD step"].get_concrete_function()
  del os.environ["DE_FUSED_LOOKUP_UPDATES"]
  return traced


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--width", type=int, default=64)
  parser.add_argument("--hotness", default="1,10")
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--quick", action="store_true", help="tiny sizes, for smoke tests")
  args = parser.parse_args()
  rows, batch, calls, warmup = data.ROWS, data.BATCH, 12, 1.5
  if args.quick:
    rows, batch, calls, warmup, args.repeats = 1000, 64, 2, 0.0, 1
  print(f"rows {rows}, batch {batch}, width {args.width}; ms per call, median of {args.repeats}")
  print(
    "| hotness | empty step | forward | forward+backward | whole SGD step | two-pass SGD step |"
    " unique gradient MB |"
  )
  print("|---|---|---|---|---|---|---|")
  for hotness in args.hotness.split(","):
    batches = data.make_batches(0, rows, batch, hotness, data.ROTATING_BATCHES)
    inputs = [
      (tf.constant(b["values"]), tf.constant(np.append(b["offsets"], len(b["values"]))))
      for b in batches
    ]
    var = keras.Variable(data.make_table(0, rows, args.width))
    optimizer = dmp.DistributedOptimizer(keras.optimizers.SGD(0.01))
    optimizer.build([var])
    functions = parts(var, optimizer)
    for f in functions.values():  # tracing, page faults, huge-page collapse
      start = time.perf_counter()
      while True:
        for x in inputs:
          f(*x).numpy()
        if time.perf_counter() - start >= warmup:
          break
    samples = {name: [] for name in functions}
    for _ in range(args.repeats):
      for name, f in functions.items():
        start = time.perf_counter()
        for k in range(calls):
          out = f(*inputs[k % len(inputs)])
        out.numpy()
        samples[name].append((time.perf_counter() - start) / calls * 1e3)
    unique_mb = statistics.mean(len(np.unique(b["values"])) for b in batches) * args.width * 4 / 1e6
    cells = " | ".join(f"{statistics.median(samples[name]):.2f}" for name in functions)
    print(f"| {hotness} | {cells} | {unique_mb:.1f} |", flush=True)


if __name__ == "__main__":
  main()
