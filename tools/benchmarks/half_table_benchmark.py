"""Half-precision table benchmark: bfloat16 and float16 tables read in place, against float32
tables, against casting the table first (what `embedding_lookup` did before it had half kernels),
and against torch's `embedding_bag` on a table of the same dtype.

One table of V rows per dtype, ragged bags of 1..19 ids (mean 10), sum, float32 outputs (ours:
`output_dtype=tf.float32`; torch's output is the table's dtype), forward and forward+backward
(the table's sparse gradient from one contiguous float32 upstream gradient, cast to torch's dtype
for torch), in graph (a tf.function sweep over rotating batches, as kernel_benchmark.py times its
graph rows). GB/s counts the bytes of table rows gathered per forward call. Each table is looked up
for WARMUP_SECONDS first; torch's OpenMP threads wait passively (kernel_benchmark.py says why).
Repeats interleave every path; ratios are per repeat.

  .venv/bin/python tools/benchmarks/half_table_benchmark.py
  .venv/bin/python tools/benchmarks/half_table_benchmark.py --quick    # smoke test

The report goes to runs/bench/half_table.json (`--json`; with --quick, none outside a test).
"""

import argparse
import os
import statistics
import sys
import time

import numpy as np
import tensorflow as tf

import distributed_embeddings as de

import bench_report
import kernel_benchmark as kb  # sets OMP_WAIT_POLICY before it imports torch

WARMUP_SECONDS = 2.0
DTYPES = ("bfloat16", "float16")


def _tf_sweeps(name, lookup, table, batches, upstream):
  """(forward sweep, forward+backward sweep) of `lookup(ids)`, its gradient taken for `table`."""

  @tf.function
  def forward():
    out = tf.zeros([])
    for ids in batches:
      out += tf.reduce_sum(lookup(ids)[:1, :1])
    return out

  @tf.function
  def forward_backward():
    total = tf.zeros([])
    for ids, grad in zip(batches, upstream):
      with tf.GradientTape() as tape:
        out = lookup(ids)
      g = tape.gradient(out, table, output_gradients=grad)
      total += tf.reduce_sum(tf.cast(g.values[:1, :1], tf.float32))
    return total

  return (
    lambda: (forward().numpy(), len(batches))[1],
    lambda: (forward_backward().numpy(), len(batches))[1],
  )


def _torch_sweeps(table_np, dtype, batches_np, upstream_np):
  torch = kb.torch
  weight = torch.nn.Parameter(torch.from_numpy(table_np.copy()).to(getattr(torch, dtype)))
  inputs = [(torch.from_numpy(v), torch.from_numpy(o)) for v, o in batches_np]
  grads = [torch.from_numpy(g).to(weight.dtype) for g in upstream_np]

  def forward():
    with torch.no_grad():
      for v, o in inputs:
        torch.nn.functional.embedding_bag(v, weight, o, mode="sum")
    return len(inputs)

  def forward_backward():
    for (v, o), g in zip(inputs, grads):
      out = torch.nn.functional.embedding_bag(v, weight, o, mode="sum", sparse=True)
      out.backward(g)
      weight.grad = None
    return len(inputs)

  forward()  # fails here, not in the timing, when torch lacks the dtype on this CPU
  return forward, forward_backward


def main(argv):
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--vocab", type=int, default=1_000_000)
  parser.add_argument("--batch", type=int, default=8192)
  parser.add_argument("--widths", default="16,64,128")
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--quick", action="store_true", help="tiny sizes, for smoke tests")
  parser.add_argument("--json", help="the report's path (default runs/bench/half_table.json)")
  args = parser.parse_args(argv)
  if args.quick:
    args.vocab, args.batch, args.widths, args.repeats = 1000, 64, "8", 2
  if args.json is None:
    args.json = bench_report.default_path("half_table", args.quick)
  rng = np.random.default_rng(0)
  rows = []
  print("| width | table | path | fwd ms | fwd+bwd ms | fwd GB/s |")
  print("|---|---|---|---|---|---|")
  for width in (int(w) for w in args.widths.split(",")):
    table_np = rng.standard_normal((args.vocab, width)).astype(np.float32)
    tables = {"float32": tf.Variable(table_np)}
    for dtype in DTYPES:
      tables[dtype] = tf.Variable(tf.cast(table_np, dtype))
    batches_np, batches = [], []
    for _ in range(kb.ROTATING_BATCHES):
      lengths = rng.integers(1, 20, size=args.batch)
      values = rng.integers(0, args.vocab, size=int(lengths.sum()), dtype=np.int64)
      batches_np.append((values, np.concatenate([[0], np.cumsum(lengths)[:-1]])))
      batches.append(tf.RaggedTensor.from_row_lengths(values, lengths))
    nnz = np.mean([len(v) for v, _ in batches_np])
    upstream_np = [
      rng.standard_normal((args.batch, width)).astype(np.float32)
      for _ in range(kb.ROTATING_BATCHES)
    ]
    upstream = [tf.constant(g) for g in upstream_np]

    # (table dtype, path name): (sweeps, bytes per row read).
    paths = {}
    for dtype, table in tables.items():

      def ours(ids, table=table):
        return de.embedding_lookup(table, ids, "sum", output_dtype=tf.float32)

      paths[(dtype, "ours")] = (_tf_sweeps("ours", ours, table, batches, upstream), dtype)
      if dtype != "float32":

        def cast_first(ids, table=table):
          return de.embedding_lookup(tf.cast(table, tf.float32), ids, "sum")

        paths[(dtype, "cast to float32, then ours")] = (
          _tf_sweeps("cast", cast_first, table, batches, upstream),
          dtype,
        )
        if kb.torch is not None:
          try:
            paths[(dtype, "torch embedding_bag")] = (
              _torch_sweeps(table_np, dtype, batches_np, upstream_np),
              dtype,
            )
          except RuntimeError as e:  # a dtype torch's CPU embedding_bag lacks
            print(f"torch {dtype}: {e}", file=sys.stderr)
    # A fresh table is still being faulted in and collapsed into huge pages during its first
    # second or so: look each up for a while before timing anything.
    for key, ((fwd, _), _) in paths.items():
      if key[1] == "ours":
        start = time.perf_counter()
        while time.perf_counter() - start < (0.05 if args.quick else WARMUP_SECONDS):
          fwd()
    sweeps = {}
    for key, ((fwd, fwd_bwd), _) in paths.items():
      sweeps[key + ("fwd",)] = fwd
      sweeps[key + ("fwd_bwd",)] = fwd_bwd
    samples = kb.time_interleaved(sweeps, passes=1, repeats=args.repeats)
    for (dtype, path), (_, row_dtype) in paths.items():
      fwd = samples[(dtype, path, "fwd")]
      fwd_bwd = samples[(dtype, path, "fwd_bwd")]
      row = {
        "width": width,
        "table": dtype,
        "path": path,
        "fwd_ms": statistics.median(fwd) * 1e3,
        "fwd_bwd_ms": statistics.median(fwd_bwd) * 1e3,
        "fwd_gb_s": nnz * width * tf.as_dtype(row_dtype).size / statistics.median(fwd) / 1e9,
      }
      if dtype != "float32":
        ours = (samples[(dtype, "ours", "fwd")], samples[(dtype, "ours", "fwd_bwd")])
        row["ours_speedup_fwd"] = kb.paired_ratio(fwd, ours[0])
        row["ours_speedup_fwd_bwd"] = kb.paired_ratio(fwd_bwd, ours[1])
        if path == "ours":  # the half table against a float32 one, both ours
          f32 = (samples[("float32", "ours", "fwd")], samples[("float32", "ours", "fwd_bwd")])
          row["vs_float32_fwd"] = kb.paired_ratio(f32[0], fwd)
          row["vs_float32_fwd_bwd"] = kb.paired_ratio(f32[1], fwd_bwd)
      rows.append(row)
      print(
        f"| {width} | {dtype} | {path} | {row['fwd_ms']:.2f} | {row['fwd_bwd_ms']:.2f} |"
        f" {row['fwd_gb_s']:.1f} |",
        flush=True,
      )
    del tables
  if args.json:
    setup = {
      "vocab": args.vocab,
      "batch": args.batch,
      "repeats": args.repeats,
      "rotating_batches": kb.ROTATING_BATCHES,
      "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }
    bench_report.write(
      args.json, "half_table", bench_report.command(__file__, argv), rows, setup=setup
    )
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
