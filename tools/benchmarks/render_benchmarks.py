"""Renders BENCHMARKS.md's measured tables from the reports the benchmarks write (runs/bench/*.json).

BENCHMARKS.md marks each generated block with a pair of comments; everything between them is
replaced, everything outside them is left as written:

  <!-- BEGIN kernel_summary -->
  ...generated...
  <!-- END kernel_summary -->

Reports, one JSON object per file, told apart by their "benchmark" field:
  * "kernel" (tools/benchmarks/kernel_benchmark.py --json): command, date, machine, versions,
    baselines (per width: gather ceiling, step floor) and rows (one per case and path); the rows
    of several reports (one per set of widths) are merged;
  * "train_step" (tools/benchmarks/train_step_benchmark.py): command, date, machine, setup,
    systems, versions and rows (one per optimizer, width and hotness). Without this report its
    blocks read "(not yet measured)".
Other reports are ignored. Python standard library only, so any python3 can run it:

  python3 tools/benchmarks/render_benchmarks.py          # rewrite BENCHMARKS.md in place
  python3 tools/benchmarks/render_benchmarks.py --check  # exit 1 if BENCHMARKS.md is stale
"""

import argparse
import difflib
import glob
import json
import os
import re
import statistics
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NOT_MEASURED = "(not yet measured)"
TORCH = "torch embedding_bag"
HOTNESS = ("1", "10", "powerlaw")
FORMATS = ("dense", "ragged", "sparse")
KEYS = (("ours_speedup_fwd", "fwd"), ("ours_speedup_fwd_bwd", "fwd+bwd"))
SYSTEM_LABELS = {"ours": "ours", "tf": "tf (Keras)", "torch": "torch", "fbgemm": "FBGEMM"}
MARKER = re.compile(r"<!-- BEGIN (\w+) -->\n(.*?)<!-- END (\w+) -->", re.DOTALL)


class RenderError(Exception):
  pass


def load_reports(json_dir):
  """{benchmark name: [report, ...]} from every *.json in json_dir, in file name order."""
  reports = {}
  for path in sorted(glob.glob(os.path.join(json_dir, "*.json"))):
    with open(path, encoding="utf-8") as f:
      report = json.load(f)
    if not isinstance(report, dict) or "benchmark" not in report or "rows" not in report:
      raise RenderError(f"{path}: not a benchmark report (an object with benchmark and rows)")
    report["_path"] = os.path.basename(path)
    reports.setdefault(report["benchmark"], []).append(report)
  return reports


# Formatting.


def ratio(value):
  return "-" if value is None else f"{value:.2f}x"


def ms(value):
  return "-" if value is None else f"{value:.2f}"


def spread(values):
  """'median (min-max)' of ratios."""
  return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def faster(values, threshold=1.0):
  return f"{sum(v > threshold for v in values)}/{len(values)}"


def versions(report):
  """'TF 2.21.0, torch 2.13.0+cpu' from a report's versions; per system ('ours: TF 2.21.0; torch:
  torch 2.13.0+cpu') when the report gives each system its own."""
  names = {"tensorflow": "TF", "torch": "torch", "fbgemm_gpu": "FBGEMM"}

  def listed(flat):
    return ", ".join(f"{names[k]} {v}" for k, v in sorted(flat.items()) if k in names and v)

  found = report.get("versions", {})
  if found and all(isinstance(v, dict) for v in found.values()):
    return "; ".join(f"{system}: {listed(v)}" for system, v in found.items())
  return listed(found)


def provenance(report):
  return (
    f"`{report['command']}`: {report['date']}, {report['machine']}; {versions(report)}"
    f" ({report['_path']})."
  )


# Kernel benchmark.


def kernel_cases(reports):
  """{(width, hotness, combiner, format): {path: row}} over every kernel report."""
  cases = {}
  for report in reports:
    for row in report["rows"]:
      key = (int(row["width"]), str(row["hotness"]), row["combiner"], row["format"])
      paths = cases.setdefault(key, {})
      if row["path"] in paths:
        raise RenderError(f"{report['_path']}: case {key}, path {row['path']!r} twice")
      paths[row["path"]] = row
  return cases


def torch_ratios(cases, key, width=None, hotness=None):
  return [
    paths[TORCH][key]
    for (w, h, _, _), paths in cases.items()
    if TORCH in paths and width in (None, w) and hotness in (None, h)
  ]


def best_tf(paths, key):
  """TF's best path in a case: the one with the smallest ratio to ours (name, row)."""
  tf_paths = {name: row for name, row in paths.items() if name.startswith("tf ")}
  if not tf_paths:
    return None, None
  name = min(tf_paths, key=lambda n: tf_paths[n][key])
  return name, tf_paths[name]


def tf_ratios(cases, key, fmt):
  ratios = []
  for (_, _, _, f), paths in cases.items():
    _, row = best_tf(paths, key)
    if f == fmt and row is not None:
      ratios.append(row[key])
  return ratios


def render_kernel_summary(reports):
  if not reports:
    return [NOT_MEASURED]
  cases = kernel_cases(reports)
  widths = sorted({w for w, _, _, _ in cases})
  lines = [f"- {provenance(r)}" for r in reports]
  lines += [
    "",
    "| width | hotness | torch cases | fwd: torch / ours, median (range) | ours faster |"
    " fwd+bwd: torch / ours, median (range) | ours faster |",
    "|---|---|---|---|---|---|---|",
  ]
  # Every width and hotness, then all cases together (all widths by hotness: kernel_targets).
  for width, hotness in [(w, h) for w in widths for h in HOTNESS] + [(None, None)]:
    fwd = torch_ratios(cases, KEYS[0][0], width, hotness)
    fwd_bwd = torch_ratios(cases, KEYS[1][0], width, hotness)
    if not fwd:
      continue
    label = ("all" if width is None else str(width), "all" if hotness is None else hotness)
    cells = [*label, str(len(fwd)), spread(fwd), faster(fwd), spread(fwd_bwd), faster(fwd_bwd)]
    lines.append("| " + " | ".join(cells) + " |")
  return lines


def short_tf_name(name):
  return name.removeprefix("tf ").replace("embedding_lookup_sparse", "lookup_sparse")


def render_kernel_table(reports, width):
  cases = {k: v for k, v in kernel_cases(reports).items() if k[0] == width}
  if not cases:
    return [NOT_MEASURED]
  lines = [
    "| hotness | combiner | format | ours ms fwd / fwd+bwd | ours fwd GB/s | best TF path |"
    " TF ms fwd / fwd+bwd | TF / ours | torch ms fwd / fwd+bwd | torch / ours |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for key, paths in cases.items():  # in the benchmark's order: hotness, combiner, format
    ours = paths["ours"]
    fwd_name, fwd_row = best_tf(paths, KEYS[0][0])
    bwd_name, bwd_row = best_tf(paths, KEYS[1][0])
    if fwd_name is None:
      tf_cells = ["-", "-", "-"]
    else:
      names = short_tf_name(fwd_name)
      if bwd_name != fwd_name:
        names += f" (fwd), {short_tf_name(bwd_name)} (fwd+bwd)"
      tf_cells = [
        names,
        f"{ms(fwd_row['fwd_ms'])} / {ms(bwd_row['fwd_bwd_ms'])}",
        f"{ratio(fwd_row['ours_speedup_fwd'])} / {ratio(bwd_row['ours_speedup_fwd_bwd'])}",
      ]
    torch = paths.get(TORCH)
    torch_cells = (
      ["-", "-"]
      if torch is None
      else [
        f"{ms(torch['fwd_ms'])} / {ms(torch['fwd_bwd_ms'])}",
        f"{ratio(torch['ours_speedup_fwd'])} / {ratio(torch['ours_speedup_fwd_bwd'])}",
      ]
    )
    cells = [
      key[1],
      key[2],
      key[3],
      f"{ms(ours['fwd_ms'])} / {ms(ours['fwd_bwd_ms'])}",
      f"{ours['fwd_gb_s']:.1f}",
      *tf_cells,
      *torch_cells,
    ]
    lines.append("| " + " | ".join(cells) + " |")
  for report in reports:
    base = report.get("baselines", {}).get(str(width), {})
    parts = []
    if "gather_ceiling_gb_s" in base:
      parts.append(
        f"NumPy `take` of the same random rows (the gather ceiling)"
        f" {base['gather_ceiling_gb_s']:.1f} GB/s"
      )
    if "step_floor_ms" in base:
      parts.append(f"TF's step floor {base['step_floor_ms']:.2f} ms")
    if parts:
      lines += ["", "Same run: " + "; ".join(parts) + "."]
  return lines


def verdict(values, threshold, every_case=False):
  """met (every case), met on median, or missed; every_case: met only if every case is."""
  if min(values) >= threshold:
    return "met"
  below = f"({sum(v < threshold for v in values)} of {len(values)} below)"
  if not every_case and statistics.median(values) >= threshold:
    return f"met on median {below}"
  return f"**missed** {below}"


def render_kernel_targets(reports):
  if not reports:
    return [NOT_MEASURED]
  cases = kernel_cases(reports)
  lines = [
    "| target (issue 5) | cases | fwd: median (range) | fwd verdict | fwd+bwd: median (range) |"
    " fwd+bwd verdict |",
    "|---|---|---|---|---|---|",
  ]
  targets = [
    (
      f"no slower than torch, hotness {h}",
      1.0,
      lambda key, h=h: torch_ratios(cases, key, hotness=h),
    )
    for h in HOTNESS
  ]
  targets += [
    (f"3x TF's best non-XLA path, {f} ids", 3.0, lambda key, f=f: tf_ratios(cases, key, f))
    for f in FORMATS
  ]
  for label, threshold, ratios in targets:
    fwd, fwd_bwd = ratios(KEYS[0][0]), ratios(KEYS[1][0])
    if fwd:
      cells = [label, str(len(fwd)), spread(fwd), verdict(fwd, threshold)]
      cells += [spread(fwd_bwd), verdict(fwd_bwd, threshold)]
      lines.append("| " + " | ".join(cells) + " |")
  return lines


# Training-step benchmark.


def train_step_report(reports):
  if len(reports) > 1:
    raise RenderError("more than one train_step report: " + ", ".join(r["_path"] for r in reports))
  return reports[0] if reports else None


def system_label(system):
  return SYSTEM_LABELS.get(system, system)


def render_train_step(reports):
  report = train_step_report(reports)
  if report is None:
    return [NOT_MEASURED]
  systems = report["systems"]
  setup = ", ".join(
    f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}" for k, v in report.get("setup", {}).items()
  )
  lines = [provenance(report) + (f" Setup: {setup}." if setup else ""), ""]
  header = ["optimizer", "width", "hotness", *(f"{system_label(s)} ms" for s in systems)]
  header += ["best peer / ours", "ours GB/s"]
  lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for row in report["rows"]:
    best = row.get("best_peer_over_ours")
    gbs = row.get("ours_gb_per_s")
    cells = [row["optimizer"], str(row["width"]), str(row["hotness"])]
    cells += [ms(row["ms"].get(s)) for s in systems]
    cells.append("-" if best is None else f"{best:.2f}x ({row['best_peer']})")
    cells.append("-" if gbs is None else f"{gbs:.1f}")
    lines.append("| " + " | ".join(cells) + " |")
  lines.append("")
  for optimizer in dict.fromkeys(row["optimizer"] for row in report["rows"]):
    values = [
      r["best_peer_over_ours"]
      for r in report["rows"]
      if r["optimizer"] == optimizer and r.get("best_peer_over_ours") is not None
    ]
    if values:
      met = sum(v >= 1.0 for v in values)
      lines.append(
        f"- {optimizer}: best peer / ours median {statistics.median(values):.2f}x"
        f" ({min(values):.2f}-{max(values):.2f}); ours at least as fast in {met}/{len(values)}."
      )
    else:
      lines.append(f"- {optimizer}: no peer measured.")
  lines += ["", "Notes per system (`-` in the table: the system has no such update):"]
  for system in systems:
    by_note = {}  # note: the optimizers it was given for
    for row in report["rows"]:
      note = row.get("notes", {}).get(system, "").rstrip(".")
      if note:
        by_note.setdefault(note, {})[row["optimizer"]] = None
    if len(by_note) == 1:
      lines.append(f"- {system_label(system)}: {next(iter(by_note))}.")
    elif by_note:
      text = "; ".join(f"{', '.join(opts)}: {note}" for note, opts in by_note.items())
      lines.append(f"- {system_label(system)}: {text}.")
  return lines


def render_train_step_targets(train_reports, kernel_reports):
  report = train_step_report(train_reports)
  lines = ["| target (issue 18) | measured | verdict |", "|---|---|---|"]
  if report is None:
    lines.append(
      f"| every optimizer, width and hotness no slower than the best peer | {NOT_MEASURED} | - |"
    )
  else:
    measured = [r for r in report["rows"] if r.get("best_peer_over_ours") is not None]
    if measured:
      worst = min(measured, key=lambda r: r["best_peer_over_ours"])
      met = sum(r["best_peer_over_ours"] >= 1.0 for r in measured)
      lines.append(
        f"| every optimizer, width and hotness no slower than the best peer | {met}/"
        f"{len(measured)} cases at 1.00x or more; slowest {worst['best_peer_over_ours']:.2f}x"
        f" ({worst['optimizer']}, width {worst['width']}, hotness {worst['hotness']}) |"
        f" {'met' if met == len(measured) else '**missed**'} |"
      )
  for optimizer in ("sgd", "adagrad"):
    label = f"{optimizer}, width 64, hotness 10: at least 2x faster than the best peer"
    row = None
    if report is not None:
      row = next(
        (
          r
          for r in report["rows"]
          if r["optimizer"] == optimizer and int(r["width"]) == 64 and str(r["hotness"]) == "10"
        ),
        None,
      )
    if report is None:
      lines.append(f"| {label} | {NOT_MEASURED} | - |")
    elif row is None or row.get("best_peer_over_ours") is None:
      lines.append(f"| {label} | not in this run | - |")
    else:
      value = row["best_peer_over_ours"]
      lines.append(
        f"| {label} | {value:.2f}x ({row['best_peer']}) |"
        f" {'met' if value >= 2.0 else '**missed**'} |"
      )
  values = torch_ratios(kernel_cases(kernel_reports), KEYS[1][0]) if kernel_reports else []
  if values:
    lines.append(
      f"| lookup forward+backward no slower than torch (kernel benchmark) | median"
      f" {statistics.median(values):.2f}x, ours faster in {faster(values)} |"
      f" {verdict(values, 1.0, every_case=True)} |"
    )
  return lines


# The document.


def render_blocks(reports):
  kernel = reports.get("kernel", [])
  train = reports.get("train_step", [])
  return {
    "kernel_summary": render_kernel_summary(kernel),
    "kernel_w64": render_kernel_table(kernel, 64),
    "kernel_targets": render_kernel_targets(kernel),
    "train_step": render_train_step(train),
    "train_step_targets": render_train_step_targets(train, kernel),
  }


def render(doc, blocks):
  """doc with every marked block replaced; every block must appear exactly once."""
  seen = []

  def replace(match):
    name, end = match.group(1), match.group(3)
    if name != end:
      raise RenderError(f"BEGIN {name} closed by END {end}")
    if name not in blocks:
      raise RenderError(f"unknown block {name!r}; known: {', '.join(blocks)}")
    seen.append(name)
    return f"<!-- BEGIN {name} -->\n" + "\n".join(blocks[name]) + f"\n<!-- END {name} -->"

  out = MARKER.sub(replace, doc)
  for name in blocks:
    if seen.count(name) != 1:
      raise RenderError(f"block {name!r} appears {seen.count(name)} times (expected once)")
  return out


def main(argv):
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--doc", default=os.path.join(REPO, "BENCHMARKS.md"))
  parser.add_argument("--json-dir", default=os.path.join(REPO, "runs", "bench"))
  parser.add_argument("--check", action="store_true", help="exit 1 if the doc is out of date")
  args = parser.parse_args(argv[1:])
  with open(args.doc, encoding="utf-8") as f:
    doc = f.read()
  try:
    new = render(doc, render_blocks(load_reports(args.json_dir)))
  except RenderError as e:
    print(f"render_benchmarks: {e}", file=sys.stderr)
    return 1
  if args.check:
    if new == doc:
      return 0
    diff = difflib.unified_diff(
      doc.splitlines(), new.splitlines(), "BENCHMARKS.md", "rendered", lineterm="", n=1
    )
    print("\n".join(list(diff)[:60]), file=sys.stderr)
    print(
      f"render_benchmarks: {args.doc} differs from the tables of {args.json_dir}/*.json;"
      " run python3 tools/benchmarks/render_benchmarks.py",
      file=sys.stderr,
    )
    return 1
  if new != doc:
    with open(args.doc, "w", encoding="utf-8") as f:
      f.write(new)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
