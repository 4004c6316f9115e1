"""A worker process for the multi-process tests; started by distributed_embeddings.launch."""

import argparse
import os
import sys

import keras
import numpy as np
import tensorflow as tf

from distributed_embeddings import dist_model_parallel as dmp
from distributed_embeddings.python.parallel import communicator as comm_lib
import dist_case


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", required=True)
  parser.add_argument("--mode", choices=["fit", "crash", "backup", "modes"], required=True)
  parser.add_argument("--crash_once", action="store_true", help="backup mode: rank 1 dies once")
  args = parser.parse_args()
  comm = dmp.init_from_env()
  if args.mode == "crash":
    if comm.rank == 1:
      print("rank 1 dies before its first collective", flush=True)
      os._exit(3)  # pylint: disable=protected-access
    comm.all_reduce(tf.ones([1]))  # Waits for rank 1, which never comes.
    return 0
  if args.mode == "modes":
    # Every parallelism mode, dense and ragged ids, in one process per worker.
    results = {}
    for name, mode in dist_case.MODES.items():
      for id_format, combiner in (("dense", "sum"), ("ragged", "mean")):
        outs, tables = dist_case.train_worker(comm, mode, combiner, id_format=id_format)
        for k, value in enumerate(outs + tables):
          results[f"{name}/{id_format}/{k}"] = value
    np.savez(os.path.join(args.out, f"rank{comm.rank}.npz"), **results)
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
    tables, kernel = dist_case.fit(comm, epochs=4, optimizer="adagrad",
                                   callbacks=[backup, CrashOnce()])
  else:
    tables, kernel = dist_case.fit(comm)
  np.savez(os.path.join(args.out, f"rank{comm.rank}.npz"), kernel=kernel,
           local_rank=comm_lib.local_rank(-1), *tables)
  return 0


if __name__ == "__main__":
  sys.exit(main())
