"""The JSON report every benchmark writes under runs/bench/, for render_benchmarks.py.

A report is one object: "benchmark" (which renderer reads it), "command", "date", "machine",
"versions", "rows" (the measurements), plus whatever else the benchmark keeps (setup, raw rounds).
Standard library only: the peers' venv and `bazel run` use it too.
"""

import datetime
import json
import os
import platform
import sys

import render_benchmarks  # beside this file: the renderer must read what is written

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def machine():
  """'AMD EPYC 9R45, 2 CPUs, 23.5 GiB': the CPU model, CPU count and memory of this machine."""
  model = platform.machine()
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    pass
  memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
  return f"{model}, {os.cpu_count()} CPUs, {memory:.1f} GiB"


def default_path(name, quick=False):
  """runs/bench/<name>.json of the checkout (of the workspace under `bazel run`). A --quick run
  writes no report, except in a test (its TEST_TMPDIR), so a smoke test keeps the report's format
  and its renderer in step."""
  if quick:
    tmp = os.environ.get("TEST_TMPDIR")
    return os.path.join(tmp, name + ".json") if tmp else None
  root = os.environ.get("BUILD_WORKSPACE_DIRECTORY", REPO)
  return os.path.join(root, "runs", "bench", name + ".json")


def versions():
  """Versions of the frameworks this process has imported (a benchmark imports what it times);
  TensorFlow's installed one when a driver only starts processes that import it."""
  found = {}
  for module in ("tensorflow", "torch", "fbgemm_gpu"):
    if module in sys.modules:
      found[module] = getattr(sys.modules[module], "__version__", None)
  if "tensorflow" not in found:
    from importlib import metadata  # pylint: disable=import-outside-toplevel

    for dist in ("tensorflow-cpu", "tensorflow"):
      try:
        found["tensorflow"] = metadata.version(dist)
        break
      except metadata.PackageNotFoundError:
        continue
  return found


def command(script, argv):
  """The command line that reproduces a run, from the repository root."""
  return " ".join([f"tools/benchmarks/{os.path.basename(script)}"] + list(argv))


def write(path, benchmark, cmd, rows, **fields):
  """Writes the report to `path` (its folder made if missing) and says so."""
  report = {
    "benchmark": benchmark,
    "command": cmd,
    "date": datetime.date.today().isoformat(),
    "machine": machine(),
    "versions": fields.pop("versions", None) or versions(),
    "rows": rows,
  }
  report.update(fields)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(report, f, indent=1)
    f.write("\n")
  print(f"wrote {path}", flush=True)
  report["_path"] = os.path.basename(path)
  print("\n".join(render_benchmarks.render_report(report)), flush=True)
  return report
