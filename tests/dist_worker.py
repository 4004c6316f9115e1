"""A worker process for the multi-process tests, started by distributed_embeddings.launch (or,
for the failure cases, by the test itself with TF_CONFIG, as a cluster manager would)."""

import argparse
import json
import os
import sys
import time

import keras
import numpy as np
import tensorflow as tf

from distributed_embeddings import dist_model_parallel as dmp
from distributed_embeddings.python.parallel import communicator as comm_lib
import dist_case
import model_parallel_case as mpc


def pattern_cases(n):
  """The model-parallel cases every worker count runs, as processes over gRPC."""
  even = [[3] * n, [3] * n, [1] * n]
  return {
    "subclassed_eager": mpc.Case(dict(), [[3] * n] * 2),
    "traced_mixed_placements_partial_batch": mpc.Case(
      dict(column_slice_threshold=60, row_slice_threshold=300, data_parallel_threshold=40),
      even,
      graph=True,
    ),
    "uneven_local_batches": mpc.Case(
      dict(row_slice_threshold=300), [list(range(1, n + 1)), list(range(n, 0, -1))], graph=True
    ),
    "model_parallel_input_one_hot": mpc.Case(dict(dp_input=False), [[2] * n] * 2),
    "ragged_mean_traced": mpc.Case(
      dict(row_slice_threshold=100),
      even,
      kind="ours",
      combiner="mean",
      id_format="ragged",
      graph=True,
    ),
    "functional_sparse": mpc.Case(
      dict(column_slice_threshold=60),
      [[2] * n] * 2,
      model="functional",
      kind="ours",
      combiner="sum",
      id_format="sparse",
    ),
  }


def run_patterns(comm, out):
  """Each case on this worker and, as the reference, on one process over the global batch; the
  largest differences go to rank<r>.json."""
  report = {}
  for name, case in pattern_cases(comm.world_size).items():
    ref_outputs, ref_tables, ref_dense, _ = mpc.train(
      case, comm_lib.Communicator(0, 1), distributed=False
    )
    outputs, tables, dense, sharded = mpc.train(case, comm)
    errors = []
    for s, o in enumerate(outputs):
      ref = ref_outputs[s][mpc.local_rows(case, comm.rank, s)]
      errors.append(float(np.max(np.abs(o - ref) / (1 + np.abs(ref)))))
    errors += [
      float(np.max(np.abs(a - b) / (1 + np.abs(b))))
      for a, b in zip(tables + dense, ref_tables + ref_dense)
    ]
    report[name] = {"error": max(errors), "sharded": bool(any(sharded))}
  with open(os.path.join(out, f"rank{comm.rank}.json"), "w") as f:
    json.dump(report, f)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", required=True)
  parser.add_argument(
    "--mode", choices=["fit", "crash", "backup", "patterns", "peer_dies", "stuck"], required=True
  )
  parser.add_argument("--crash_once", action="store_true", help="backup mode: rank 1 dies once")
  args = parser.parse_args()
  comm = dmp.init_from_env()
  if args.mode == "crash":
    if comm.rank == 1:
      print("rank 1 dies before its first collective", flush=True)
      os._exit(3)  # pylint: disable=protected-access
    comm.all_reduce(tf.ones([1]))  # Waits for rank 1, which never comes.
    return 0
  if args.mode in ("peer_dies", "stuck"):
    # After one collective together, rank 1 dies (or hangs); rank 0's next collective must fail
    # within bounded time, saying why. No launcher watches these workers.
    comm.all_reduce(tf.ones([1]))
    ready = os.path.join(args.out, "rank0_done_first_collective")
    if comm.rank == 1:
      # Rank 1 returns from the collective before rank 0 may have received all of it; leaving
      # then would fail rank 0's first collective instead of its second. Wait for rank 0.
      deadline = time.monotonic() + 60
      while not os.path.exists(ready) and time.monotonic() < deadline:
        time.sleep(0.05)
      if args.mode == "peer_dies":
        os._exit(3)  # pylint: disable=protected-access
      time.sleep(120)
      return 0
    with open(ready, "w"):
      pass
    start = time.monotonic()
    try:
      comm.all_reduce(tf.ones([1]))
      result = {"error": None}
    except tf.errors.OpError as error:
      result = {"error": type(error).__name__, "message": str(error)}
    result["seconds"] = time.monotonic() - start
    with open(os.path.join(args.out, "rank0.json"), "w") as f:
      json.dump(result, f)
    os._exit(0)  # pylint: disable=protected-access
  if args.mode == "patterns":
    run_patterns(comm, args.out)
    return 0
  if args.mode == "backup":
    # Rank 1 dies when epoch 3 begins, once; a relaunch resumes from the epoch-2 backup.
    marker = os.path.join(args.out, "crashed_once")

    class CrashOnce(keras.callbacks.Callback):
      def on_epoch_begin(self, epoch, logs=None):
        if args.crash_once and epoch == 2 and comm.rank == 1 and not os.path.exists(marker):
          open(marker, "w").close()
          print("rank 1 dies at the start of epoch 3", flush=True)
          os._exit(3)  # pylint: disable=protected-access

    backup = dmp.BackupAndRestore(os.path.join(args.out, "backup"), comm)
    tables, kernel = dist_case.fit(
      comm, epochs=4, optimizer="adagrad", callbacks=[backup, CrashOnce()]
    )
  else:
    tables, kernel = dist_case.fit(comm)
  np.savez(
    os.path.join(args.out, f"rank{comm.rank}.npz"),
    kernel=kernel,
    local_rank=comm_lib.local_rank(-1),
    *tables,
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
