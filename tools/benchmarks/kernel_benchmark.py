"""Kernel benchmark: distributed_embeddings.embedding_lookup against TF's native paths and torch.

All paths run in one process on the same tables and ids. Ids rotate through several batches so
rows come from memory rather than L3; each timing is the median over repeats of the mean time of
a block of calls. Effective bandwidth = bytes of table rows gathered per call / time. The machine's
random-row gather ceiling (NumPy `take` of the same rows) is measured in the same run.

TensorFlow paths are timed in graph by default: one tf.function call runs the lookup on each of
the rotating batches in turn, each lookup waiting for the previous one (a control dependency, so
none overlap), and the time per lookup is the call time over the number of batches. That is how
lookups run inside a training step, and it leaves out the fixed cost of entering a tf.function
from Python (about 0.4 ms on the 2-vCPU development VM), which torch's eager calls do not pay.
`--dispatch per-call` times one tf.function call per lookup instead.

  .venv/bin/python tools/benchmarks/kernel_benchmark.py            # full grid, markdown to stdout
  .venv/bin/python tools/benchmarks/kernel_benchmark.py --quick    # one small case (smoke test)

torch rows appear when PyTorch is installed (pip install torch==2.13.0).
"""

import argparse
import json
import statistics
import sys
import time

import numpy as np
import tensorflow as tf

import distributed_embeddings as de

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
  inputs = {"ragged": ragged, "sparse": ragged.to_sparse(), "values": values,
            "offsets": np.concatenate([[0], np.cumsum(lengths)[:-1]]), "nnz": len(values)}
  if hotness not in ("powerlaw", "uniform"):
    inputs["dense"] = tf.constant(values.reshape(batch, int(hotness)))
  return inputs


def time_block(fn, batches, iters, repeats):
  """Median over `repeats` of the mean seconds per call over `iters` calls."""
  fn(batches[0])  # warm-up: tracing, allocation
  samples = []
  for _ in range(repeats):
    start = time.perf_counter()
    for i in range(iters):
      fn(batches[i % len(batches)])
    samples.append((time.perf_counter() - start) / iters)
  return statistics.median(samples)


def tf_paths(table, combiner, fmt, dispatch):
  """name -> (forward fn, forward+backward fn) of TF-based paths for one input format.

  With dispatch "in-graph" each fn takes the list of all rotating batches and looks them up in
  turn inside one tf.function; with "per-call" it takes one batch.
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

  candidates = {"dense": {"ours": ours, "tf gather+reduce": native_dense},
                "ragged": {"ours": ours, "tf ragged gather+reduce": native_ragged},
                "sparse": {"ours": ours, "tf embedding_lookup_sparse": native_sparse,
                           "tf safe_embedding_lookup_sparse": native_safe_sparse}}[fmt]
  paths = {}
  for name, forward in candidates.items():

    def fwd(ids, forward=forward):
      return forward(ids)[0, 0]

    def fwd_bwd(ids, forward=forward):
      with tf.GradientTape() as tape:
        out = forward(ids)
        loss = tf.reduce_sum(out)
      grad = tape.gradient(loss, table)
      # Using the output too keeps TF from pruning the forward gather.
      return out[0, 0] + grad.values[0, 0] + tf.cast(grad.indices[0], out.dtype)

    if dispatch == "per-call":
      paths[name] = (tf.function(fwd), tf.function(fwd_bwd))
    else:
      paths[name] = (tf.function(_chained(fwd)), tf.function(_chained(fwd_bwd)))
  return paths


def _chained(step):
  """Runs `step` on each batch of a list in turn, each after the previous one has finished.

  Every step's result feeds the returned sum. A step reached only through a control dependency
  would not run: Grappler's dependency optimizer turns stateless nodes whose outputs nobody reads
  into no-ops, which dropped all but the last backward pass of a chain.
  """

  def run(batches):
    total = tf.constant(0.0)
    for ids in batches:
      with tf.control_dependencies([total]):
        total = total + step(ids)
    return total

  return run


def torch_paths(table_np, combiner):
  weight = torch.nn.Parameter(torch.from_numpy(table_np))

  def forward(batch):
    values, offsets = batch
    return torch.nn.functional.embedding_bag(values, weight, offsets, mode=combiner, sparse=True)

  def fwd_bwd(batch):
    weight.grad = None
    out = forward(batch)
    out.sum().backward()
    return out

  return {"torch embedding_bag": (lambda b: forward(b).detach(), fwd_bwd)}


def gather_ceiling(table_np, batches):
  """GB/s of NumPy's random-row gather of the same rows (the latency-bound baseline)."""
  values = [b["values"] for b in batches]
  seconds = time_block(lambda v: np.take(table_np, v, axis=0), values, 5, 5)
  return len(values[0]) * table_np.shape[1] * 4 / seconds / 1e9


def run_case(rng, table_np, table_var, batch, hotness, combiner, args):
  width = table_np.shape[1]
  batches = [make_inputs(rng, table_np.shape[0], batch, hotness) for _ in range(ROTATING_BATCHES)]
  nnz = np.mean([b["nnz"] for b in batches])
  bytes_gathered = nnz * width * 4
  rows = []
  formats = (["dense"] if "dense" in batches[0] else []) + ["ragged", "sparse"]
  for fmt in formats:
    results = {}
    for name, (fwd, fwd_bwd) in tf_paths(table_var, combiner, fmt, args.dispatch).items():
      inputs = [b[fmt] for b in batches]
      if args.dispatch == "per-call":
        results[name] = (time_block(fwd, inputs, args.iters, args.repeats),
                         time_block(fwd_bwd, inputs, args.iters, args.repeats))
      else:  # one call looks up every batch; enough calls per block for at least iters lookups
        calls = max(1, args.iters // len(inputs) + 1)
        results[name] = tuple(
            time_block(fn, [inputs], calls, args.repeats) / len(inputs) for fn in (fwd, fwd_bwd))
    if torch is not None:
      for name, (fwd, fwd_bwd) in torch_paths(table_np, combiner).items():
        inputs = [(torch.from_numpy(b["values"]), torch.from_numpy(b["offsets"])) for b in batches]
        results[name] = (time_block(fwd, inputs, args.iters, args.repeats),
                         time_block(fwd_bwd, inputs, args.iters, args.repeats))
    ours_fwd, ours_bwd = results["ours"]
    for name, (fwd, fwd_bwd) in results.items():
      rows.append({"width": width, "hotness": str(hotness), "combiner": combiner, "format": fmt,
                   "path": name, "fwd_ms": fwd * 1e3, "fwd_bwd_ms": fwd_bwd * 1e3,
                   "fwd_gb_s": bytes_gathered / fwd / 1e9,
                   "ours_speedup_fwd": fwd / ours_fwd, "ours_speedup_fwd_bwd": fwd_bwd / ours_bwd})
  return rows


def main(argv):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--vocab", type=int, default=1_000_000)
  parser.add_argument("--widths", default="16,64,256")
  parser.add_argument("--batch", type=int, default=8192)
  parser.add_argument("--hotness", default="1,10,powerlaw")
  parser.add_argument("--combiners", default="sum,mean")
  parser.add_argument("--iters", type=int, default=10)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--threads", type=int, default=0, help="TF intra-op threads (0: default)")
  parser.add_argument("--dispatch", choices=("in-graph", "per-call"), default="in-graph",
                      help="how TF paths are called (module docstring)")
  parser.add_argument("--json", help="also write the rows here")
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
  print("| width | hotness | combiner | format | path | fwd ms | fwd+bwd ms | fwd GB/s |"
        " ours faster fwd | ours faster fwd+bwd |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for width in [int(w) for w in args.widths.split(",")]:
    table_np = rng.random((args.vocab, width), dtype=np.float32)
    table_var = tf.Variable(table_np)
    # The first lookup starts the background huge-page collapse of a large table (about 1 s per
    # 256 MB); let it finish so that it does not run inside the first timed case.
    de.embedding_lookup(table_var, tf.zeros([1, 1], tf.int64), combiner="sum")
    time.sleep(0 if args.quick else 2.0 * table_np.nbytes / 2**28)
    ceiling = gather_ceiling(table_np, [make_inputs(rng, args.vocab, args.batch, 10)
                                        for _ in range(ROTATING_BATCHES)])
    print(f"| {width} | - | - | - | numpy take (gather ceiling) | - | - | {ceiling:.1f} | - | - |")
    for hotness in args.hotness.split(","):
      for combiner in args.combiners.split(","):
        for row in run_case(rng, table_np, table_var, args.batch, hotness, combiner, args):
          rows.append(row)
          print(f"| {row['width']} | {row['hotness']} | {row['combiner']} | {row['format']} | "
                f"{row['path']} | {row['fwd_ms']:.2f} | {row['fwd_bwd_ms']:.2f} | "
                f"{row['fwd_gb_s']:.1f} | {row['ours_speedup_fwd']:.2f}x | "
                f"{row['ours_speedup_fwd_bwd']:.2f}x |", flush=True)
    del table_var
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(rows, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
