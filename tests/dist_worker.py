"""A worker process for the multi-process tests; started by distributed_embeddings.launch."""

import argparse
import os
import sys

import numpy as np
import tensorflow as tf

from distributed_embeddings import dist_model_parallel as dmp
import dist_case


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", required=True)
  parser.add_argument("--mode", choices=["fit", "crash"], required=True)
  args = parser.parse_args()
  comm = dmp.init_from_env()
  if args.mode == "crash":
    if comm.rank == 1:
      print("rank 1 dies before its first collective", flush=True)
      os._exit(3)  # pylint: disable=protected-access
    comm.all_reduce(tf.ones([1]))  # Waits for rank 1, which never comes.
    return 0
  tables, kernel = dist_case.fit(comm)
  np.savez(os.path.join(args.out, f"rank{comm.rank}.npz"), kernel=kernel, *tables)
  return 0


if __name__ == "__main__":
  sys.exit(main())
