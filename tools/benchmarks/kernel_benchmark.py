"""Kernel benchmark: distributed_embeddings.embedding_lookup against TF's native paths and torch.

All paths run in one process on the same tables and ids. Ids rotate through several batches so
rows come from memory rather than L3; each timing is the median over repeats of the mean time of
a block of calls. Effective bandwidth = bytes of table rows gathered per call / time. The machine's
random-row gather ceiling (NumPy `take` of the same rows) is measured in the same run.

TensorFlow paths are timed in graph by default: one tf.function call runs the lookup on each of
the rotating batches in turn, each lookup waiting for the previous one, and the time per lookup is
the call time over the number of batches. That is how lookups run inside a training step. The
batches are captured by the function rather than passed to it, so a call does not pay Python's
flattening of 7 ragged or sparse arguments (about 1 ms on the 2-vCPU development VM), a cost torch's
calls do not have. A "tf in-graph step floor" row gives what one chained step costs with no lookup
in it: TF's executor overhead, which every TF path pays and torch does not. `--dispatch per-call`
times one tf.function call per lookup instead.

Forward+backward gives every system the same upstream gradient: one contiguous [batch, width]
array per batch (random, from the same seed), `output_gradients` for TensorFlow and
`y.backward(g)` for torch. A `.sum().backward()` would hand torch a stride-0 gradient, which
sends `embedding_bag`'s sparse backward down a slow path (nearly 2x slower here).

The machine is shared and noisy, so every repeat times every path once, in a rotating order, and
the ratios reported are medians of the ratios within a repeat, not ratios of medians.

  .venv/bin/python tools/benchmarks/kernel_benchmark.py            # full grid, markdown to stdout
  .venv/bin/python tools/benchmarks/kernel_benchmark.py --quick    # one small case (smoke test)

torch rows appear when PyTorch is installed (pip install torch==2.13.0).
"""

import argparse
import datetime
import json
import os
import statistics
import sys
import time

# torch's OpenMP threads spin for a while after each of its calls by default, and on 2 cores that
# spinning lands on whatever is timed next in this process (measured: our weighted sum forward at
# width 16 read 1.44 ms interleaved with torch, 0.87 ms with passive waiting). Set before torch
# is imported, here and in the benchmarks that import this module.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402  pylint: disable=wrong-import-position
import tensorflow as tf  # noqa: E402  pylint: disable=wrong-import-position

import distributed_embeddings as de  # noqa: E402  pylint: disable=wrong-import-position

import bench_report  # noqa: E402  pylint: disable=wrong-import-position

try:
  import torch  # pylint: disable=import-error
except ImportError:  # torch is optional
  torch = None

ROTATING_BATCHES = 7


def make_lengths(rng, batch, hotness):
  if hotness == "powerlaw":  # lengths >= 1 with a heavy tail, mean about 10
    return np.minimum(rng.zipf(1.6, size=batch) + 5, 200)
  if hotness == "uniform":
    return rng.integers(1, 20, size=batch)
  return np.full(batch, int(hotness))


def make_inputs(rng, vocab, batch, hotness):
  """One batch in every format: dense (fixed hotness only), ragged, sparse, torch offsets."""
  lengths = make_lengths(rng, batch, hotness)
  values = rng.integers(0, vocab, size=int(lengths.sum()), dtype=np.int64)
  ragged = tf.RaggedTensor.from_row_lengths(values, lengths)
  inputs = {
    "ragged": ragged,
    "sparse": ragged.to_sparse(),
    "values": values,
    "offsets": np.concatenate([[0], np.cumsum(lengths)[:-1]]),
    "nnz": len(values),
  }
  if hotness not in ("powerlaw", "uniform"):
    inputs["dense"] = tf.constant(values.reshape(batch, int(hotness)))
  return inputs


def time_interleaved(sweeps, passes, repeats):
  """Seconds per lookup of each path: {name: [one sample per repeat]}.

  `sweeps` maps a name to a function that looks up every rotating batch once and returns how many
  lookups it ran. Each repeat times `passes` sweeps of every path, the paths in an order that
  rotates between repeats, so a burst of load from other jobs lands on all paths alike.
  """
  names = list(sweeps)
  for name in names:
    sweeps[name]()  # warm-up: tracing, allocation
  samples = {name: [] for name in names}
  for r in range(repeats):
    for name in names[r % len(names) :] + names[: r % len(names)]:
      lookups = 0
      start = time.perf_counter()
      for _ in range(passes):
        lookups += sweeps[name]()
      samples[name].append((time.perf_counter() - start) / lookups)
  return samples


def paired_ratio(peer, ours):
  """Median over repeats of peer time / our time within the same repeat."""
  return statistics.median(p / o for p, o in zip(peer, ours))


def tf_paths(table, combiner, fmt, dispatch, batches, upstream):
  """name -> (forward sweep, forward+backward sweep) of TF-based paths for one input format.

  A sweep looks up every batch of `batches` once and returns the number of lookups. In graph it is
  one tf.function call that captures the batches; per call it is one call per batch. The backward
  of batch i starts from upstream[i] (module docstring).
  """

  def ours(ids):
    return de.embedding_lookup(table, ids, combiner=combiner)

  def native_dense(ids):
    rows = tf.nn.embedding_lookup(table, ids)
    return tf.reduce_sum(rows, 1) if combiner == "sum" else tf.reduce_mean(rows, 1)

  def native_ragged(ids):
    rows = tf.ragged.map_flat_values(tf.nn.embedding_lookup, table, ids)
    return tf.reduce_sum(rows, 1) if combiner == "sum" else tf.reduce_mean(rows, 1)

  def native_sparse(ids):
    return tf.nn.embedding_lookup_sparse(table, ids, None, combiner=combiner)

  def native_safe_sparse(ids):
    return tf.nn.safe_embedding_lookup_sparse(table, ids, None, combiner=combiner)

  candidates = {
    "dense": {"ours": ours, "tf gather+reduce": native_dense},
    "ragged": {"ours": ours, "tf ragged gather+reduce": native_ragged},
    "sparse": {
      "ours": ours,
      "tf embedding_lookup_sparse": native_sparse,
      "tf safe_embedding_lookup_sparse": native_safe_sparse,
    },
  }[fmt]
  paths = {}
  for name, forward in candidates.items():

    def fwd(ids, forward=forward):
      return forward(ids)[0, 0]

    def fwd_bwd(batch, forward=forward):
      ids, up = batch
      with tf.GradientTape() as tape:
        out = forward(ids)
      grad = tape.gradient(out, table, output_gradients=up)
      # Using the output too keeps TF from pruning the forward gather.
      return out[0, 0] + grad.values[0, 0] + tf.cast(grad.indices[0], out.dtype)

    paths[name] = (
      _sweep(fwd, batches, dispatch),
      _sweep(fwd_bwd, list(zip(batches, upstream)), dispatch),
    )
  return paths


def _sweep(step, batches, dispatch):
  """A function running `step` on every batch once (module docstring); returns the count."""
  if dispatch == "per-call":
    call = tf.function(step)

    def per_call():
      for ids in batches:
        call(ids).numpy()
      return len(batches)

    return per_call
  chained = tf.function(_chained(step, batches))
  return lambda: (chained().numpy(), len(batches))[1]


def _chained(step, batches):
  """Runs `step` on each batch in turn, each after the previous one has finished.

  Every step's result feeds the returned sum. A step reached only through a control dependency
  would not run: Grappler's dependency optimizer turns stateless nodes whose outputs nobody reads
  into no-ops, which dropped all but the last backward pass of a chain.
  """

  def run():
    total = tf.constant(0.0)
    for ids in batches:
      with tf.control_dependencies([total]):
        total = total + step(ids)
    return total

  return run


def step_floor(batches):
  """Seconds per chained in-graph step whose only work is reading one id: TF's executor cost."""
  values = [tf.constant(b["values"]) for b in batches]
  sweep = _sweep(lambda ids: tf.cast(ids[0], tf.float32), values, "in-graph")
  return statistics.median(time_interleaved({"floor": sweep}, 3, 5)["floor"])


def torch_paths(table_np, combiner, batches, upstream):
  """name -> (forward sweep, forward+backward sweep) of torch's embedding_bag, as tf_paths."""
  weight = torch.nn.Parameter(torch.from_numpy(table_np))
  inputs = [(torch.from_numpy(b["values"]), torch.from_numpy(b["offsets"])) for b in batches]
  grads = [torch.from_numpy(up) for up in upstream]  # contiguous, as TF's

  def forward(values, offsets):
    return torch.nn.functional.embedding_bag(values, weight, offsets, mode=combiner, sparse=True)

  def fwd():
    for values, offsets in inputs:
      forward(values, offsets).detach()
    return len(inputs)

  def fwd_bwd():
    for (values, offsets), grad in zip(inputs, grads):
      weight.grad = None
      forward(values, offsets).backward(grad)
    return len(inputs)

  return {"torch embedding_bag": (fwd, fwd_bwd)}


def gather_ceiling(table_np, batches):
  """GB/s of NumPy's random-row gather of the same rows (the latency-bound baseline)."""
  values = [b["values"] for b in batches]

  def sweep():
    for v in values:
      np.take(table_np, v, axis=0)
    return len(values)

  seconds = statistics.median(time_interleaved({"take": sweep}, 1, 5)["take"])
  return len(values[0]) * table_np.shape[1] * 4 / seconds / 1e9


def run_case(rng, table_np, table_var, batch, hotness, combiner, args):
  width = table_np.shape[1]
  batches = [make_inputs(rng, table_np.shape[0], batch, hotness) for _ in range(ROTATING_BATCHES)]
  upstream = [
    rng.standard_normal((batch, width)).astype(np.float32) for _ in range(ROTATING_BATCHES)
  ]
  upstream_tf = [tf.constant(up) for up in upstream]
  nnz = np.mean([b["nnz"] for b in batches])
  bytes_gathered = nnz * width * 4
  # Enough sweeps of the rotating batches per timed block for at least `iters` lookups.
  passes = max(1, -(-args.iters // ROTATING_BATCHES))
  rows = []
  formats = (["dense"] if "dense" in batches[0] else []) + ["ragged", "sparse"]
  for fmt in formats:
    paths = tf_paths(
      table_var, combiner, fmt, args.dispatch, [b[fmt] for b in batches], upstream_tf
    )
    if torch is not None:
      paths.update(torch_paths(table_np, combiner, batches, upstream))
    fwd = time_interleaved({name: p[0] for name, p in paths.items()}, passes, args.repeats)
    fwd_bwd = time_interleaved({name: p[1] for name, p in paths.items()}, passes, args.repeats)
    for name in paths:
      fwd_s = statistics.median(fwd[name])
      rows.append(
        {
          "width": width,
          "hotness": str(hotness),
          "combiner": combiner,
          "format": fmt,
          "path": name,
          "fwd_ms": fwd_s * 1e3,
          "fwd_bwd_ms": statistics.median(fwd_bwd[name]) * 1e3,
          "fwd_gb_s": bytes_gathered / fwd_s / 1e9,
          "ours_speedup_fwd": paired_ratio(fwd[name], fwd["ours"]),
          "ours_speedup_fwd_bwd": paired_ratio(fwd_bwd[name], fwd_bwd["ours"]),
        }
      )
  return rows


def summarize(rows):
  """Markdown lines: for torch and for TF's best path per format, the median over cases of the
  (paired) ratio peer time / our time, and in how many cases ours is faster."""
  cases = {}
  for row in rows:
    cases.setdefault((row["width"], row["hotness"], row["combiner"], row["format"]), {})[
      row["path"]
    ] = row

  def line(label, ratios):
    if not ratios:
      return []
    faster = sum(r > 1 for r in ratios)
    return [
      f"| {label} | {statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
      f" | {faster}/{len(ratios)} |"
    ]

  lines = ["| peer, cases | median ratio (range) | ours faster |", "|---|---|---|"]
  for key, name in (("ours_speedup_fwd", "fwd"), ("ours_speedup_fwd_bwd", "fwd+bwd")):
    for hotness in (None, "1", "10", "powerlaw"):
      lines += line(
        f"torch {name}, " + ("all" if hotness is None else f"hotness {hotness}"),
        [
          c["torch embedding_bag"][key]
          for k, c in cases.items()
          if "torch embedding_bag" in c and hotness in (None, k[1])
        ],
      )
    for fmt in ("dense", "ragged", "sparse"):
      # TF's best path in each case: the one with the smallest ratio to ours.
      lines += line(
        f"best TF {name}, {fmt} ids",
        [
          min(r[key] for n, r in c.items() if n.startswith("tf "))
          for k, c in cases.items()
          if k[3] == fmt
        ],
      )
  return lines


def main(argv):
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--vocab", type=int, default=1_000_000)
  parser.add_argument("--widths", default="16,64,256")
  parser.add_argument("--batch", type=int, default=8192)
  parser.add_argument("--hotness", default="1,10,powerlaw")
  parser.add_argument("--combiners", default="sum,mean")
  parser.add_argument("--iters", type=int, default=10)
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--threads", type=int, default=0, help="TF intra-op threads (0: default)")
  parser.add_argument(
    "--dispatch",
    choices=("in-graph", "per-call"),
    default="in-graph",
    help="how TF paths are called (module docstring)",
  )
  parser.add_argument("--json", help="also write the report (JSON: run, machine, rows) here")
  parser.add_argument("--quick", action="store_true", help="one small case, for smoke tests")
  args = parser.parse_args(argv[1:])
  if args.quick:
    args.vocab, args.widths, args.batch, args.hotness = 10_000, "16", 256, "10"
    args.combiners, args.iters, args.repeats = "sum", 2, 2
  if args.threads:
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    if torch is not None:
      torch.set_num_threads(args.threads)

  # Each path is its own tf.function built from the same Python closure, which TF's retracing
  # warning miscounts as retracing (each traces once).
  tf.get_logger().setLevel("ERROR")
  rng = np.random.default_rng(0)
  rows = []
  baselines = {}  # per width: the gather ceiling and the step floor, for the JSON report
  print(
    "| width | hotness | combiner | format | path | fwd ms | fwd+bwd ms | fwd GB/s |"
    " ours faster fwd | ours faster fwd+bwd |"
  )
  print("|---|---|---|---|---|---|---|---|---|---|")
  for width in [int(w) for w in args.widths.split(",")]:
    table_np = rng.random((args.vocab, width), dtype=np.float32)
    table_var = tf.Variable(table_np)
    # The first lookup starts the background huge-page collapse of a large table (about 1 s per
    # 256 MB); let it finish so that it does not run inside the first timed case.
    de.embedding_lookup(table_var, tf.zeros([1, 1], tf.int64), combiner="sum")
    time.sleep(0 if args.quick else 2.0 * table_np.nbytes / 2**28)
    ceiling = gather_ceiling(
      table_np, [make_inputs(rng, args.vocab, args.batch, 10) for _ in range(ROTATING_BATCHES)]
    )
    print(f"| {width} | - | - | - | numpy take (gather ceiling) | - | - | {ceiling:.1f} | - | - |")
    baselines[str(width)] = {"gather_ceiling_gb_s": ceiling}
    if args.dispatch == "in-graph":
      floor = step_floor(
        [make_inputs(rng, args.vocab, args.batch, 1) for _ in range(ROTATING_BATCHES)]
      )
      print(f"| {width} | - | - | - | tf in-graph step floor | {floor * 1e3:.2f} | - | - | - | - |")
      baselines[str(width)]["step_floor_ms"] = floor * 1e3
    for hotness in args.hotness.split(","):
      for combiner in args.combiners.split(","):
        for row in run_case(rng, table_np, table_var, args.batch, hotness, combiner, args):
          rows.append(row)
          print(
            f"| {row['width']} | {row['hotness']} | {row['combiner']} | {row['format']} | "
            f"{row['path']} | {row['fwd_ms']:.2f} | {row['fwd_bwd_ms']:.2f} | "
            f"{row['fwd_gb_s']:.1f} | {row['ours_speedup_fwd']:.2f}x | "
            f"{row['ours_speedup_fwd_bwd']:.2f}x |",
            flush=True,
          )
    del table_var
  print()
  print("\n".join(summarize(rows)))
  if args.json:
    # The report tools/benchmarks/render_benchmarks.py turns into BENCHMARKS.md's kernel tables.
    report = {
      "benchmark": "kernel",
      "command": "tools/benchmarks/kernel_benchmark.py " + " ".join(argv[1:]),
      "date": datetime.date.today().isoformat(),
      "machine": bench_report.machine(),
      "versions": {
        "tensorflow": tf.__version__,
        "torch": torch.__version__ if torch is not None else None,
      },
      "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
      "baselines": baselines,
      "rows": rows,
    }
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(report, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
