"""Weighted-bag benchmark: our weighted lookup against TF's weighted path and torch's.

One table of V rows, ragged bags of 1..19 ids (mean 10) with one random weight per id, the
forward pass and forward+backward (gradient of the table only, from one contiguous upstream
gradient shared by every system), in graph (one tf.function sweep over rotating batches, as
kernel_benchmark.py times its graph rows). Paths:
  * ours:  `embedding_lookup(table, ragged_ids, combiner, weights=ragged_weights)`;
  * tf:    `tf.nn.embedding_lookup_sparse(table, sp_ids, sp_weights, combiner)` (TF's weighted
           path: gather, multiply, segment reduce);
  * torch: `embedding_bag(mode="sum", per_sample_weights=w, sparse=True)` (torch weighs only
           sums), when torch is installed.
Each table is looked up for WARMUP_SECONDS before timing (page faults, huge-page collapse), and
torch's OpenMP threads wait passively (OMP_WAIT_POLICY: kernel_benchmark.py says why).
Repeats interleave the paths (kernel_benchmark.time_interleaved); ratios are per repeat.

  .venv/bin/python tools/benchmarks/weighted_lookup_benchmark.py
  .venv/bin/python tools/benchmarks/weighted_lookup_benchmark.py --quick    # smoke test

The report goes to runs/bench/weighted_lookup.json (`--json`; with --quick, none outside a test).
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


def _tf_sweeps(table, combiner, batches, upstream):
  """{path: (forward sweep, forward+backward sweep)} for ours and TF's weighted path."""

  def ours(ids, weights):
    return de.embedding_lookup(table, ids, combiner, weights=weights)

  def native(ids, weights):
    return tf.nn.embedding_lookup_sparse(
      table, ids.to_sparse(), weights.to_sparse(), combiner=combiner
    )

  sweeps = {}
  for name, lookup in (("ours", ours), ("tf embedding_lookup_sparse", native)):

    @tf.function
    def forward(lookup=lookup):
      out = tf.zeros([])
      for ids, weights in batches:
        out += tf.reduce_sum(lookup(ids, weights)[:1, :1])
      return out

    @tf.function
    def forward_backward(lookup=lookup):
      total = tf.zeros([])
      for (ids, weights), grad in zip(batches, upstream):
        with tf.GradientTape() as tape:
          out = lookup(ids, weights)
        g = tape.gradient(out, table, output_gradients=grad)
        total += tf.reduce_sum(g.values[:1, :1])
      return total

    sweeps[name] = (
      lambda f=forward: (f().numpy(), len(batches))[1],
      lambda f=forward_backward: (f().numpy(), len(batches))[1],
    )
  return sweeps


def _torch_sweeps(table_np, batches_np, upstream_np):
  torch = kb.torch
  weight = torch.nn.Parameter(torch.from_numpy(table_np.copy()))
  inputs = [
    (torch.from_numpy(v), torch.from_numpy(o), torch.from_numpy(w)) for v, o, w in batches_np
  ]
  grads = [torch.from_numpy(g) for g in upstream_np]

  def forward():
    with torch.no_grad():
      for v, o, w in inputs:
        torch.nn.functional.embedding_bag(v, weight, o, mode="sum", per_sample_weights=w)
    return len(inputs)

  def forward_backward():
    for (v, o, w), g in zip(inputs, grads):
      out = torch.nn.functional.embedding_bag(
        v, weight, o, mode="sum", per_sample_weights=w, sparse=True
      )
      out.backward(g)
      weight.grad = None
    return len(inputs)

  return {"torch embedding_bag(per_sample_weights)": (forward, forward_backward)}


def main(argv):
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--vocab", type=int, default=1_000_000)
  parser.add_argument("--batch", type=int, default=8192)
  parser.add_argument("--widths", default="16,64")
  parser.add_argument("--combiners", default="sum,mean,sqrtn")
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--quick", action="store_true", help="tiny sizes, for smoke tests")
  parser.add_argument("--json", help="the report's path (default runs/bench/weighted_lookup.json)")
  args = parser.parse_args(argv)
  if args.quick:
    args.vocab, args.batch, args.widths, args.repeats = 1000, 64, "8", 2
  if args.json is None:
    args.json = bench_report.default_path("weighted_lookup", args.quick)
  rng = np.random.default_rng(0)
  rows = []
  print("| width | combiner | path | fwd ms | fwd+bwd ms | ours faster fwd | fwd+bwd |")
  print("|---|---|---|---|---|---|---|")
  for width in (int(w) for w in args.widths.split(",")):
    table_np = rng.standard_normal((args.vocab, width)).astype(np.float32)
    table = tf.Variable(table_np)
    batches_np, batches = [], []
    for _ in range(kb.ROTATING_BATCHES):
      lengths = rng.integers(1, 20, size=args.batch)
      values = rng.integers(0, args.vocab, size=int(lengths.sum()), dtype=np.int64)
      weights = rng.random(len(values)).astype(np.float32)
      offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
      batches_np.append((values, offsets, weights))
      batches.append(
        (
          tf.RaggedTensor.from_row_lengths(values, lengths),
          tf.RaggedTensor.from_row_lengths(weights, lengths),
        )
      )
    upstream_np = [
      rng.standard_normal((args.batch, width)).astype(np.float32)
      for _ in range(kb.ROTATING_BATCHES)
    ]
    upstream = [tf.constant(g) for g in upstream_np]
    # A fresh table is still being faulted in, and collapsed into huge pages, during its first
    # second or so: look it up for a while before timing anything, as train_step_benchmark does.
    warm = _tf_sweeps(table, "sum", batches, upstream)["ours"][0]
    start = time.perf_counter()
    while time.perf_counter() - start < (0.1 if args.quick else WARMUP_SECONDS):
      warm()
    for combiner in args.combiners.split(","):
      paths = _tf_sweeps(table, combiner, batches, upstream)
      if kb.torch is not None and combiner == "sum":
        paths.update(_torch_sweeps(table_np, batches_np, upstream_np))
      sweeps = {}
      for name, (fwd, fwd_bwd) in paths.items():
        sweeps[(name, "fwd")] = fwd
        sweeps[(name, "fwd_bwd")] = fwd_bwd
      samples = kb.time_interleaved(sweeps, passes=1, repeats=args.repeats)
      for name in paths:
        row = {
          "width": width,
          "combiner": combiner,
          "path": name,
          "fwd_ms": statistics.median(samples[(name, "fwd")]) * 1e3,
          "fwd_bwd_ms": statistics.median(samples[(name, "fwd_bwd")]) * 1e3,
          "ours_speedup_fwd": kb.paired_ratio(samples[(name, "fwd")], samples[("ours", "fwd")]),
          "ours_speedup_fwd_bwd": kb.paired_ratio(
            samples[(name, "fwd_bwd")], samples[("ours", "fwd_bwd")]
          ),
        }
        rows.append(row)
        print(
          f"| {width} | {combiner} | {name} | {row['fwd_ms']:.2f} | {row['fwd_bwd_ms']:.2f} | "
          f"{row['ours_speedup_fwd']:.2f}x | {row['ours_speedup_fwd_bwd']:.2f}x |",
          flush=True,
        )
    del table
  if args.json:
    setup = {
      "vocab": args.vocab,
      "batch": args.batch,
      "repeats": args.repeats,
      "rotating_batches": kb.ROTATING_BATCHES,
      "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }
    bench_report.write(
      args.json, "weighted_lookup", bench_report.command(__file__, argv), rows, setup=setup
    )
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
