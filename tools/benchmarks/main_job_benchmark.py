"""Main-job benchmark: the synthetic DLRM (examples/synthetic_dlrm.py) run end to end, per setting.

Each run is a fresh `synthetic_dlrm.py` process (through the launcher for several workers) that
writes its summary.json; this program collects samples/s (from the median step time after
warm-up), the evaluation AUC and the all-to-all bytes per step. Runs of one suite alternate their
settings round by round, so a burst of load on this shared machine lands on all of them.

  --suite workers   the tiny preset on 1, 2 and 4 workers (`balanced` placement, sparse Adagrad)
  --suite updates   one worker, the small preset (two rounds) and the medium preset's first 60
                    steps, with our update kernels and the lookup's backward fused into them (the
                    default), the kernels after a separate backward (DE_FUSED_LOOKUP_UPDATES=0),
                    no kernels (DE_FUSED_SPARSE_UPDATES=0: the same rows-only rule in TF
                    gather/scatter ops) and, on the small preset, stock Keras tables and optimizer

  .venv/bin/python tools/benchmarks/main_job_benchmark.py --suite workers
  .venv/bin/python tools/benchmarks/main_job_benchmark.py --quick    # smoke test: tiny, 20 steps

The report goes to runs/bench/main_job_<suite>.json (`--json`; with --quick, none outside a test).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_report  # noqa: E402  pylint: disable=wrong-import-position

# The main job, found beside this file in the checkout and in Bazel's runfiles alike.
MAIN_JOB = os.path.join(bench_report.REPO, "examples", "synthetic_dlrm.py")


def suite_runs(suite, rounds):
  """[(round, setting)]: setting = {preset, workers, steps, update}, alternating per round.

  update: "fused" (our kernels, the backward fused in), "two_pass" (DE_FUSED_LOOKUP_UPDATES=0),
  "tf_ops" (DE_FUSED_SPARSE_UPDATES=0) or "stock" (Keras Embedding tables and Keras's Adagrad:
  `--embeddings stock`)."""
  if suite == "workers":
    settings = [{"preset": "tiny", "workers": n, "steps": 0, "update": "fused"} for n in (1, 2, 4)]
    return [(r, s) for r in range(rounds) for s in (settings if r % 2 == 0 else settings[::-1])]
  if suite == "updates":
    # Stock Keras on the medium preset reads and writes the whole 6.4 GiB table and accumulator
    # every step (minutes per run): small only.
    runs = []
    for preset, steps, preset_rounds, updates in (
      ("small", 0, rounds, ("fused", "two_pass", "tf_ops", "stock")),
      ("medium", 60, 1, ("fused", "two_pass", "tf_ops")),
    ):
      for r in range(preset_rounds):
        order = updates if r % 2 == 0 else updates[::-1]
        runs += [(r, {"preset": preset, "workers": 1, "steps": steps, "update": u}) for u in order]
    return runs
  if suite == "quick":
    return [(0, {"preset": "tiny", "workers": 1, "steps": 20, "update": "fused"})]
  raise ValueError(f"unknown suite {suite!r}")


def run_main_job(setting):
  """The summary.json of one run of the main job."""
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
  env.pop("PYTHONSAFEPATH", None)
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  env.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # what the launcher sets for several workers
  env["DE_FUSED_SPARSE_UPDATES"] = "0" if setting["update"] == "tf_ops" else "1"
  env["DE_FUSED_LOOKUP_UPDATES"] = "0" if setting["update"] == "two_pass" else "1"
  with tempfile.TemporaryDirectory() as out_dir:
    cmd = [sys.executable, MAIN_JOB, "--preset", setting["preset"]]
    cmd += ["--workers", str(setting["workers"]), "--out_dir", out_dir, "--min_auc", "0"]
    if setting["update"] == "stock":
      cmd += ["--embeddings", "stock"]
    if setting["steps"]:
      cmd += ["--steps", str(setting["steps"])]
    done = subprocess.run(
      cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False
    )
    path = os.path.join(out_dir, "summary.json")
    if done.returncode != 0 or not os.path.exists(path):
      sys.stdout.write(done.stdout[-4000:])
      raise SystemExit(f"{' '.join(cmd)} failed with code {done.returncode}")
    with open(path, encoding="utf-8") as f:
      return json.load(f)


def main(argv):
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--suite", choices=["workers", "updates"], default="workers")
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--quick", action="store_true", help="one short tiny run (smoke test)")
  parser.add_argument("--json", help="the report's path (default runs/bench/main_job_SUITE.json)")
  args = parser.parse_args(argv)
  if args.json is None:
    args.json = bench_report.default_path("main_job_" + args.suite, args.quick)
  rows = []
  for r, setting in suite_runs("quick" if args.quick else args.suite, args.rounds):
    summary = run_main_job(setting)
    wire = summary.get("exchange_bytes_per_step", {})
    row = dict(setting, round=r)
    row.update(
      {
        k: summary[k]
        for k in ("samples_per_second", "eval_auc", "steps", "global_batch", "width", "tables")
      }
    )
    row["max_table_rows"] = max(summary["table_rows"])
    row["all_to_all_bytes"] = wire.get("all_to_all", 0)
    row["all_to_all_minimum"] = wire.get("minimum", 0)
    rows.append(row)
    print(
      f"{setting['preset']} workers={setting['workers']} {setting['update']} round {r}: "
      f"{row['samples_per_second']:,.0f} samples/s, eval AUC {row['eval_auc']:.4f}",
      flush=True,
    )
  if args.json:
    bench_report.write(
      args.json,
      "main_job_" + args.suite,
      bench_report.command(__file__, argv),
      rows,
    )


if __name__ == "__main__":
  main(sys.argv[1:])
