"""Training-step benchmark: lookup, backward and sparse optimizer update, against torch and FBGEMM.

One step is a pooled (sum) lookup of one 1M-row table for a batch of 8192 bags, the loss
`sum(y * y)`, its backward pass and the optimizer's update of the touched rows; the grid is
train_step_data.py's (SGD, Adagrad, row-wise Adagrad, lazy Adam; widths 16/64/256; hotness 1, 10
and power-law). Systems, each in its own process, on identical tables and ids from one seed:
  * ours:      `embedding_lookup` + `DistributedOptimizer`, one tf.function call per step with
               the batch passed as arguments, as `model.fit` does: the lookup's backward fused
               with the optimizer's update (DeSparseApplyLookupGrad);
  * ours_two_pass: the same with DE_FUSED_LOOKUP_UPDATES=0: the backward writes the unique
               gradient, then the update kernel reads it (not a peer: what the fusion gains);
  * tf:        TF's native ragged gather + `reduce_sum` with Keras's own optimizer (Keras has no
               lazy Adam: its Adam updates the whole table; no row-wise Adagrad);
  * torch:     `embedding_bag(sparse=True)` + `torch.optim` (train_step_peers.py);
  * fbgemm:    FBGEMM's table-batched embedding on CPU, backward fused with the update
               (train_step_peers.py, in its own venv: tools/benchmarks/peer_venv.sh).
Rounds alternate the systems; every round each system times every configuration once (the mean
of `--steps` steps after a warm-up of at least 5 steps and 1.5 s). Reported: the median over rounds of ms per step, the
median over rounds of (best peer / ours) within a round, and our effective bandwidth (the traffic
estimate of train_step_data.traffic_bytes / our step time).

  .venv/bin/python tools/benchmarks/train_step_benchmark.py                 # the whole grid
  .venv/bin/python tools/benchmarks/train_step_benchmark.py --optimizers sgd,adagrad --widths 64
  .venv/bin/python tools/benchmarks/train_step_benchmark.py --quick         # smoke test

Results go to runs/bench/train_step.json (`--out`); tools/benchmarks/render_benchmarks.py turns
them into BENCHMARKS.md's table.
"""

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_report  # noqa: E402  pylint: disable=wrong-import-position
import train_step_data as data  # noqa: E402  pylint: disable=wrong-import-position

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
# Warm-up: at least this many steps and seconds (a fresh table is still being faulted in, and
# collapsed into huge pages, during its first second), the same for every system.
WARMUP_STEPS, WARMUP_SECONDS = 5, 1.5
# A slow configuration (Keras's whole-table Adagrad on a 1 GB table) runs fewer steps, at least
# this many, within about this many seconds per round.
MIN_STEPS, SECONDS_PER_CONFIG = 3, 1.0
# Our two variants; neither is a peer of the other.
OURS = ("ours", "ours_two_pass")


def _tf_step(system, table, optimizer_name, hp):
  """A tf.function running one step on (values, row_splits), and the table variable."""
  import keras  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  import distributed_embeddings as de  # pylint: disable=import-outside-toplevel
  from distributed_embeddings import dist_model_parallel as dmp  # pylint: disable=import-outside-toplevel
  from distributed_embeddings.python.training import sparse_updates  # pylint: disable=import-outside-toplevel

  var = keras.Variable(table)
  sparse_updates.mark_embedding_table(var)
  lr = hp["learning_rate"]
  if optimizer_name == "sgd":
    base = keras.optimizers.SGD(lr)
  elif optimizer_name == "adagrad":
    base = keras.optimizers.Adagrad(lr, hp["initial_accumulator"], hp["epsilon"])
  elif optimizer_name == "rowwise_adagrad":
    if system == "tf":
      return None, "Keras has no row-wise Adagrad"
    base = de.RowwiseAdagrad(lr, hp["initial_accumulator"], hp["epsilon"])
  else:
    base = keras.optimizers.Adam(lr, hp["beta1"], hp["beta2"], hp["epsilon"])
  if system in OURS:
    optimizer = dmp.DistributedOptimizer(base, lazy_sparse_updates=optimizer_name == "lazy_adam")
    note = "backward fused with the update" if system == "ours" else "backward, then update"
  else:
    optimizer = base
    note = "Keras Adam: whole-table update" if optimizer_name == "lazy_adam" else "Keras optimizer"
  optimizer.build([var])

  @tf.function(input_signature=[tf.TensorSpec([None], tf.int64), tf.TensorSpec([None], tf.int64)])
  def step(values, row_splits):
    ids = tf.RaggedTensor.from_row_splits(values, row_splits, validate=False)
    with tf.GradientTape() as tape:
      if system in OURS:
        y = de.embedding_lookup(var, ids, combiner="sum")
      else:
        y = tf.reduce_sum(tf.ragged.map_flat_values(tf.nn.embedding_lookup, var, ids), axis=1)
      loss = tf.reduce_sum(y * y)
    optimizer.apply(tape.gradient(loss, [var]), [var])
    return loss

  return step, note


def run_tf_system(system, configs, args):
  """One round of a TensorFlow system over `configs`: a list of result dicts."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  results = []
  for config in configs:
    optimizer, width, hotness = config["optimizer"], int(config["width"]), str(config["hotness"])
    result = {"optimizer": optimizer, "width": width, "hotness": hotness}
    batches = data.make_batches(args.seed, args.rows, args.batch, hotness, data.ROTATING_BATCHES)
    result["traffic_bytes"] = data.traffic_bytes(batches, width, optimizer)
    step, note = _tf_step(
      system, data.make_table(args.seed, args.rows, width), optimizer, data.HYPERPARAMS[optimizer]
    )
    if step is None:
      result.update(samples_ms=[], median_ms=None, supported=False, note=note)
      results.append(result)
      continue
    inputs = [
      (tf.constant(b["values"]), tf.constant(np.append(b["offsets"], len(b["values"]))))
      for b in batches
    ]
    warm_start, k = time.perf_counter(), 0
    while k < WARMUP_STEPS or time.perf_counter() - warm_start < WARMUP_SECONDS:
      step(*inputs[k % len(inputs)]).numpy()
      k += 1
    start = time.perf_counter()
    step(*inputs[0]).numpy()
    first = time.perf_counter() - start
    steps = max(MIN_STEPS, min(args.steps, int(SECONDS_PER_CONFIG / max(first, 1e-6))))
    start = time.perf_counter()
    loss = None
    for k in range(steps):
      loss = step(*inputs[(k + 1) % len(inputs)])
    loss.numpy()
    ms = (time.perf_counter() - start) * 1e3 / steps
    result.update(samples_ms=[ms], median_ms=ms, supported=True, note=note, steps=steps)
    results.append(result)
    print(f"  {system} {optimizer} w{width} h{hotness}: {ms:.2f} ms", flush=True)
  return results


def _configs(args):
  return [
    {"optimizer": o, "width": w, "hotness": h}
    for o in args.optimizers
    for w in args.widths
    for h in args.hotness
  ]


def _python_for(system):
  if system != "fbgemm":
    return sys.executable
  python = os.path.join(REPO, ".venv-fbgemm", "bin", "python")
  if not os.path.exists(python):
    python = subprocess.run(
      ["bash", os.path.join(HERE, "peer_venv.sh")], check=True, capture_output=True, text=True
    ).stdout.strip()
  return python


def _run_round(system, configs, args):
  """One round of `system` in a fresh process; its results."""
  with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
    out = f.name
  common = [
    "--configs",
    json.dumps(configs),
    "--seed",
    str(args.seed),
    "--steps",
    str(args.steps),
    "--rows",
    str(args.rows),
    "--batch",
    str(args.batch),
    "--out",
    out,
  ]
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  if system in OURS + ("tf",):
    command = [sys.executable, os.path.abspath(__file__), "--worker", system] + common
    env["DE_FUSED_LOOKUP_UPDATES"] = "0" if system == "ours_two_pass" else "1"
  else:
    peers = os.path.join(HERE, "train_step_peers.py")
    command = [_python_for(system), peers, "--system", system, "--repeats", "1"] + common
  subprocess.run(command, check=True, env=env)
  with open(out) as f:
    report = json.load(f)
  os.unlink(out)
  return report


def _worker(args):
  results = run_tf_system(args.worker, json.loads(args.configs), args)
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  report = {"system": args.worker, "versions": {"tensorflow": tf.__version__}, "results": results}
  with open(args.out, "w") as f:
    json.dump(report, f)


def summarize(rounds, systems, configs):
  """Rows of the report: per config, each system's median ms, the best peer and the ratio."""
  rows = []
  for config in configs:
    key = (config["optimizer"], int(config["width"]), str(config["hotness"]))
    times = {s: [] for s in systems}
    traffic = None
    notes = {}
    for by_system in rounds:
      for s in systems:
        for r in by_system[s]["results"]:
          if (r["optimizer"], int(r["width"]), str(r["hotness"])) == key:
            traffic = r.get("traffic_bytes", traffic)
            notes[s] = r.get("note", "")
            if r["supported"]:
              times[s].append(r["median_ms"])
    peers = [s for s in systems if s not in OURS and times[s]]
    ratios = []
    best_name = None
    for k, by_system in enumerate(rounds):
      within = {s: times[s][k] for s in systems if len(times[s]) > k}
      peer_times = {s: t for s, t in within.items() if s not in OURS}
      if "ours" in within and peer_times:
        ratios.append(min(peer_times.values()) / within["ours"])
    if peers:
      best_name = min(peers, key=lambda s: statistics.median(times[s]))
    ours = statistics.median(times["ours"]) if times.get("ours") else None
    rows.append(
      {
        "optimizer": key[0],
        "width": key[1],
        "hotness": key[2],
        "ms": {s: (statistics.median(t) if t else None) for s, t in times.items()},
        "notes": notes,
        "best_peer": best_name,
        "best_peer_over_ours": statistics.median(ratios) if ratios else None,
        "ours_gb_per_s": (traffic / (ours * 1e-3) / 1e9) if ours and traffic else None,
      }
    )
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="tiny sizes, ours and tf only")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--rows", type=int, default=data.ROWS)
  parser.add_argument("--batch", type=int, default=data.BATCH)
  parser.add_argument("--optimizers", default=",".join(data.OPTIMIZERS))
  parser.add_argument("--widths", default=",".join(str(w) for w in data.WIDTHS))
  parser.add_argument("--hotness", default=",".join(data.HOTNESS))
  parser.add_argument("--systems", default="ours,ours_two_pass,tf,torch,fbgemm")
  parser.add_argument("--out", default=os.path.join(REPO, "runs", "bench", "train_step.json"))
  parser.add_argument("--worker", choices=OURS + ("tf",), help=argparse.SUPPRESS)
  parser.add_argument("--configs", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    return _worker(args)
  args.optimizers = args.optimizers.split(",")
  args.widths = [int(w) for w in args.widths.split(",")]
  args.hotness = args.hotness.split(",")
  systems = args.systems.split(",")
  if args.quick:
    args.rows, args.batch, args.steps, args.rounds = 1000, 64, 2, 1
    args.widths, args.hotness = [16], ["10"]
    systems = ["ours", "tf"]
    args.out = os.path.join(tempfile.mkdtemp(), "train_step.json")
  configs = _configs(args)
  rounds = []
  for r in range(args.rounds):
    order = systems[r % len(systems) :] + systems[: r % len(systems)]
    by_system = {}
    for system in order:
      print(f"round {r + 1}/{args.rounds}: {system}", flush=True)
      by_system[system] = _run_round(system, configs, args)
    rounds.append(by_system)
  rows = summarize(rounds, systems, configs)
  report = {
    "benchmark": "train_step",
    "command": "tools/benchmarks/train_step_benchmark.py " + " ".join(sys.argv[1:]),
    "date": datetime.date.today().isoformat(),
    "machine": bench_report.machine(),
    "setup": {"rows": args.rows, "batch": args.batch, "steps": args.steps, "rounds": args.rounds},
    "systems": systems,
    "versions": {s: rounds[0][s].get("versions", {}) for s in systems},
    "rows": rows,
    "rounds": rounds,
  }
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(report, f, indent=1)
  print(f"| optimizer | width | hotness | {' | '.join(systems)} | best peer / ours | ours GB/s |")
  print("|" + "---|" * (len(systems) + 5))
  for row in rows:
    cells = [f"{row['ms'][s]:.1f}" if row["ms"].get(s) else "-" for s in systems]
    ratio = row["best_peer_over_ours"]
    gbs = row["ours_gb_per_s"]
    print(
      f"| {row['optimizer']} | {row['width']} | {row['hotness']} | {' | '.join(cells)} | "
      f"{f'{ratio:.2f}x' if ratio else '-'} | {f'{gbs:.1f}' if gbs else '-'} |"
    )
  print(f"wrote {args.out}")
  return None


if __name__ == "__main__":
  main()
