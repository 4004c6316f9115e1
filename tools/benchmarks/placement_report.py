"""Placement report: peak memory and all-to-all padding of each strategy on the main job's tables.

For every preset of the main job (26 Criteo-like tables) and 2, 4 and 8 workers, each placement
strategy's plan is made by `DistributedEmbedding` itself (no variables are built), and the report
gives the largest worker's memory over the average, and the all-to-all bytes per training step
over the minimum, from `DistributedEmbedding.exchange_bytes_per_step`: every worker pads its send
block to the widest worker's, so that ratio is the widest block over the average one.

  .venv/bin/python tools/benchmarks/placement_report.py
  .venv/bin/python tools/benchmarks/placement_report.py --quick    # one preset, 2 workers

The report goes to runs/bench/placement.json (`--json`; with --quick, none outside a test).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

# pylint: disable=wrong-import-position
from examples import synthetic_dlrm
import distributed_embeddings as de
from distributed_embeddings import dist_model_parallel as dmp
from distributed_embeddings.python.layers import planner
from distributed_embeddings.python.parallel import communicator as comm_lib

import bench_report


def report(preset, world_size, strategy):
  """(peak memory / average, all-to-all bytes / minimum) of one plan."""
  config = synthetic_dlrm.PRESETS[preset]
  cards = synthetic_dlrm.cardinalities(config["cap"])
  layer = dmp.DistributedEmbedding(
    [de.Embedding(c, config["width"], combiner="sum") for c in cards],
    strategy=strategy,
    communicator=comm_lib.Communicator(0, world_size),
  )
  memory = layer.plan.bytes_per_worker()
  exchange = layer.exchange_bytes_per_step(local_batch=config["batch"] // world_size)
  return max(memory) * world_size / sum(memory), exchange["all_to_all"] / exchange["minimum"]


def main(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="one preset, 2 workers (smoke test)")
  parser.add_argument("--json", help="the report's path (default runs/bench/placement.json)")
  args = parser.parse_args(argv)
  if args.json is None:
    args.json = bench_report.default_path("placement", args.quick)
  presets = ["tiny"] if args.quick else list(synthetic_dlrm.PRESETS)
  workers = [2] if args.quick else [2, 4, 8]
  print("| preset | workers | strategy | peak memory / average | all-to-all bytes / minimum |")
  print("|---|---|---|---|---|")
  rows = []
  for preset in presets:
    for world_size in workers:
      for strategy in planner.STRATEGIES:
        memory, exchange = report(preset, world_size, strategy)
        print(f"| {preset} | {world_size} | {strategy} | {memory:.3f} | {exchange:.2f} |")
        rows.append(
          {
            "preset": preset,
            "workers": world_size,
            "strategy": strategy,
            "peak_memory_over_average": memory,
            "all_to_all_over_minimum": exchange,
          }
        )
  if args.json:
    bench_report.write(args.json, "placement", bench_report.command(__file__, argv), rows)


if __name__ == "__main__":
  main(sys.argv[1:])
