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
    systems, versions and rows (one per optimizer, width and hotness);
  * one each (bench_report.py's format) from copy_on_read_benchmark.py, optimizer_step_benchmark.py,
    placement_report.py, main_job_benchmark.py (--suite workers, --suite updates),
    large_tables_memory.py, weighted_lookup_benchmark.py and half_table_benchmark.py:
    SMALL_REPORTS below renders each into the block of its name.
A block whose report is missing reads "(not yet measured)". Other reports are ignored. Python standard library only, so any python3 can run it:

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
SYSTEM_LABELS = {
  "ours": "ours",
  "ours_two_pass": "ours in two passes",
  "tf": "tf (Keras)",
  "torch": "torch",
  "fbgemm": "FBGEMM",
}
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
  ceilings = [
    f"width {w}: {base['gather_ceiling_gb_s']:.1f} GB/s"
    for r in reports
    for w, base in sorted(r.get("baselines", {}).items(), key=lambda item: int(item[0]))
    if "gather_ceiling_gb_s" in base
  ]
  if ceilings:
    lines += [
      "",
      "NumPy `take` of the same random rows (the gather ceiling): " + ", ".join(ceilings) + ".",
    ]
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
  lines = [
    provenance(report) + (f" Setup: {setup}." if setup else ""),
    "Each cell: our ms per step, the best peer's ms and name, and best peer / ours; every"
    f" system's ms ({', '.join(system_label(s) for s in systems)}) is in the report.",
    "",
  ]
  hotness = list(dict.fromkeys(str(r["hotness"]) for r in report["rows"]))
  header = ["optimizer", "width", *(f"hotness {h}" for h in hotness), "ours GB/s (each hotness)"]
  table_rows = []
  for (optimizer, width), found in _by_setting(report["rows"], "optimizer", "width").items():
    by_hotness = {str(r["hotness"]): r for r in found}
    cells = [optimizer, str(width)]
    for h in hotness:
      row = by_hotness.get(h)
      best = None if row is None else row.get("best_peer_over_ours")
      if best is None:
        cells.append("-" if row is None else f"{ms(row['ms'].get('ours'))}, no peer")
      else:
        peer_ms = row["ms"][row["best_peer"]]
        cells.append(
          f"{ms(row['ms'].get('ours'))} vs {ms(peer_ms)} {system_label(row['best_peer'])}:"
          f" {best:.2f}x"
        )
    cells.append(
      " / ".join(
        "-"
        if by_hotness.get(h, {}).get("ours_gb_per_s") is None
        else f"{by_hotness[h]['ours_gb_per_s']:.1f}"
        for h in hotness
      )
    )
    table_rows.append(cells)
  lines += table(header, table_rows)
  lines.append("")
  keras = [
    r["ms"]["tf"] / r["ms"]["ours"]
    for r in report["rows"]
    if r["ms"].get("tf") and r["ms"].get("ours") and "tf" in systems
  ]
  if keras:
    lines.append(
      f"- against TF's native lookup with Keras's own optimizer: tf / ours {spread(keras)}"
      f" over {len(keras)} cases."
    )
  two_pass = [
    r["ms"]["ours_two_pass"] / r["ms"]["ours"]
    for r in report["rows"]
    if r["ms"].get("ours_two_pass") and r["ms"].get("ours")
  ]
  if two_pass:
    lines.append(
      f"- the backward fused with the update against the two passes (backward, then update):"
      f" two passes / fused {spread(two_pass)}, fused faster in {faster(two_pass)}."
    )
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


# The smaller benchmarks: one report each.


def single_report(reports, name):
  found = reports.get(name, [])
  if len(found) > 1:
    raise RenderError(f"more than one {name} report: " + ", ".join(r["_path"] for r in found))
  return found[0] if found else None


def table(header, rows):
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  return lines + ["| " + " | ".join(cells) + " |" for cells in rows]


def render_copy_on_read(report):
  setup = report["setup"]
  lines = [
    provenance(report),
    f"V = {setup['vocab']:,}, width {setup['width']} ({setup['table_mib']:.0f} MiB),"
    f" {setup['batch']:,} x {setup['hotness']} ids, sum; median of {setup['repeats']} x"
    f" {setup['iters']} calls in a `tf.function`.",
    "",
  ]
  lines += table(
    ["path", "before ms", "after ms", "after / before"],
    [
      [r["description"], ms(r["before_ms"]), ms(r["after_ms"]), f"{r['after_over_before']:.2f}"]
      for r in report["rows"]
    ],
  )
  ours = next(r for r in report["rows"] if r["path"] == "ours")
  # The target allows this machine's run-to-run noise (Method: 15-30%).
  verdict = "met" if ours["after_over_before"] <= 1.15 else "missed"
  lines += [
    "",
    f"Target, no copy-on-read penalty for our lookups: after / before"
    f" {ours['after_over_before']:.2f}, {verdict} (within 15%, this machine's noise).",
  ]
  return lines


def render_optimizer_step(report):
  setup = report["setup"]
  lines = [
    provenance(report),
    f"{setup['tables']} tables of {setup['rows']:,} x {setup['width']}, one-hot ids,"
    f" batch {setup['batch']:,}, a Dense head, `model.fit`; median over {setup['repeats']}"
    f" epochs of {setup['steps']} steps.",
    "",
  ]
  labels = {
    "SGD": "SGD",
    "Adagrad": "Adagrad (rows only, same results)",
    "Adam": "Adam (Keras's whole-table update)",
  }
  rows = []
  for r in report["rows"]:
    label = (
      "Adam, `lazy_sparse_updates=True`"
      if r["lazy_sparse_updates"]
      else labels.get(r["optimizer"], r["optimizer"])
    )
    rows.append([label, f"{r['stock_ms']:.1f}", f"{r['ours_ms']:.1f}", ratio(r["stock_over_ours"])])
  return lines + table(["optimizer", "stock Keras ms/step", "ours ms/step", "stock / ours"], rows)


def render_placement(report):
  by_key = {}
  for r in report["rows"]:
    # The two strategies the text compares; the report keeps every strategy.
    if r["strategy"] in ("memory_optimized", "balanced"):
      by_key.setdefault((r["preset"], r["strategy"]), {})[r["workers"]] = r
  workers = sorted({r["workers"] for r in report["rows"]})
  counts = " / ".join(str(w) for w in workers)
  rows = []
  for (preset, strategy), cells in by_key.items():
    memory = " / ".join(f"{cells[w]['peak_memory_over_average']:.3f}" for w in workers)
    wire = " / ".join(f"{cells[w]['all_to_all_over_minimum']:.2f}" for w in workers)
    rows.append([preset, f"`{strategy}`", memory, wire])
  header = [
    "preset",
    "strategy",
    f"peak memory / average, {counts} workers",
    "all-to-all bytes / minimum",
  ]
  return [provenance(report), ""] + table(header, rows)


def _by_setting(rows, *keys):
  """{setting: [row, ...]} in first-seen order."""
  grouped = {}
  for r in rows:
    grouped.setdefault(tuple(r[k] for k in keys), []).append(r)
  return grouped


def samples(rows):
  return " / ".join(f"{r['samples_per_second']:,.0f}" for r in rows)


def aucs(rows):
  values = sorted({f"{r['eval_auc']:.4f}" for r in rows})
  return " / ".join(values)


def render_main_job_workers(report):
  lines = [provenance(report), ""]
  rows = []
  for (workers,), runs in _by_setting(report["rows"], "workers").items():
    runs = sorted(runs, key=lambda r: r["round"])
    rows.append(
      [
        str(workers),
        samples(runs),
        aucs(runs),
        f"{runs[0]['all_to_all_bytes']:,}",
        f"{runs[0]['all_to_all_minimum']:,}",
      ]
    )
  header = ["workers", "samples/s (per round)", "eval AUC", "all-to-all bytes / step", "minimum"]
  return lines + table(header, rows)


def render_main_job_updates(report):
  lines = [provenance(report), ""]
  rows = []
  updates = ("fused", "two_pass", "tf_ops", "stock")
  for (preset, steps), runs in _by_setting(report["rows"], "preset", "steps").items():
    by_update = {
      update: sorted((r for r in runs if r["update"] == update), key=lambda r: r["round"])
      for update in updates
    }
    first = runs[0]
    label = (
      f"{preset}: {first['tables']} tables of up to {first['max_table_rows']:,} rows,"
      f" width {first['width']}, batch {first['global_batch']:,}, {first['steps']} steps"
    )
    median = {
      update: statistics.median(r["samples_per_second"] for r in group)
      for update, group in by_update.items()
      if group
    }
    cells = [label] + [samples(group) if group else "-" for group in by_update.values()]
    for other in ("two_pass", "tf_ops", "stock"):
      cells.append(f"{median['fused'] / median[other]:.2f}" if other in median else "-")
    cells.append(aucs(by_update["fused"] + by_update["two_pass"] + by_update["tf_ops"]))
    rows.append(cells)
  header = [
    "preset",
    "fused samples/s",
    "two passes",
    "TF-op rows-only update",
    "stock Keras",
    "fused / two passes",
    "fused / TF ops",
    "fused / stock",
    "eval AUC (ours)",
  ]
  return lines + table(header, rows)


def render_large_tables_memory(report):
  floor = report["floor"]
  setup = report["setup"]
  lines = [
    provenance(report),
    f"Host {setup['host_gib']:.1f} GiB, tables {floor['tables_gib']:.2f} GiB, {setup['steps']}"
    " SGD steps; GiB per worker, the largest over ranks.",
    "",
  ]
  rows = []
  for r in report["rows"]:
    ranks = r["ranks"]

    def most(key, ranks=ranks):
      return max(rank[key] for rank in ranks)

    rows.append(
      [
        str(r["workers"]),
        f"{most('shards_gib'):.2f}",
        f"{most('rss_after_build_gib'):.2f}",
        f"{most('train_above_build_gib'):+.2f}",
        f"{most('weights_returned_gib'):.2f}",
        f"{most('get_weights_above_returned_gib'):+.2f}",
      ]
    )
  header = [
    "workers",
    "shards",
    "after build",
    "training peak above build",
    "`get_weights(True)` returns",
    "its peak above that",
  ]
  lines += table(header, rows)
  lines += [
    "",
    f"The test's own floor with a library holding nothing: {floor['peak_gib']:.1f} GiB per"
    " worker (Keras model, two weight lists, `assertAllClose` temporaries).",
  ]
  return lines


def render_weighted_lookup(report):
  setup = report["setup"]
  lines = [
    provenance(report),
    f"V = {setup['vocab']:,} float32 rows, batch {setup['batch']:,}, bags of 1..19 ids with a"
    f" random weight each, {setup['rotating_batches']} rotating batches, in graph; median of"
    f" {setup['repeats']} interleaved repeats, `OMP_WAIT_POLICY={setup.get('omp_wait_policy')}`."
    " Ratios: peer time / ours in the same repeat (above 1: ours faster).",
    "",
  ]
  by_case = _by_setting(report["rows"], "width", "combiner")
  peers = list(dict.fromkeys(r["path"] for r in report["rows"] if r["path"] != "ours"))
  rows = []
  for (width, combiner), found in by_case.items():
    paths = {r["path"]: r for r in found}
    cells = [str(width), combiner, ms(paths["ours"]["fwd_ms"]), ms(paths["ours"]["fwd_bwd_ms"])]
    for peer in peers:
      r = paths.get(peer)
      cells.append(
        "-" if r is None else f"{ratio(r['ours_speedup_fwd'])} / {ratio(r['ours_speedup_fwd_bwd'])}"
      )
    rows.append(cells)
  header = ["width", "combiner", "ours fwd ms", "ours fwd+bwd ms"]
  header += [f"{peer}: peer / ours, fwd / fwd+bwd" for peer in peers]
  lines += table(header, rows)
  lines.append("")
  for peer in dict.fromkeys(r["path"] for r in report["rows"] if r["path"] != "ours"):
    mine = [r for r in report["rows"] if r["path"] == peer]
    fwd = [r["ours_speedup_fwd"] for r in mine]
    both = [r["ours_speedup_fwd_bwd"] for r in mine]
    lines.append(
      f"- against {peer}: forward {spread(fwd)}, ours faster in {faster(fwd)};"
      f" forward+backward {spread(both)}, ours faster in {faster(both)}."
    )
  return lines


def render_half_table(report):
  setup = report["setup"]
  lines = [
    provenance(report),
    f"V = {setup['vocab']:,} rows per table, batch {setup['batch']:,}, bags of 1..19 ids, sum,"
    f" float32 outputs, {setup['rotating_batches']} rotating batches, in graph; median of"
    f" {setup['repeats']} interleaved repeats, `OMP_WAIT_POLICY={setup.get('omp_wait_policy')}`."
    " GB/s: table bytes gathered per forward call. Ratios, fwd / fwd+bwd: that path's time / ours"
    " on the same half table in the same repeat (above 1: ours faster); against float32: our"
    " float32 table's time / our half table's.",
    "",
  ]
  rows = []
  for (width, dtype), found in _by_setting(report["rows"], "width", "table").items():
    paths = {r["path"]: r for r in found}
    if dtype == "float32":
      continue
    ours = paths["ours"]
    cells = [
      str(width),
      dtype,
      f"{ms(ours['fwd_ms'])} / {ms(ours['fwd_bwd_ms'])}",
      f"{ours['fwd_gb_s']:.1f}",
      f"{ratio(ours['vs_float32_fwd'])} / {ratio(ours['vs_float32_fwd_bwd'])}",
    ]
    cast = paths.get("cast to float32, then ours")
    cells.append("-" if cast is None else ratio(cast["ours_speedup_fwd"]))
    torch = paths.get("torch embedding_bag")
    cells.append(
      "-"
      if torch is None
      else f"{ratio(torch['ours_speedup_fwd'])} / {ratio(torch['ours_speedup_fwd_bwd'])}"
    )
    rows.append(cells)
  lines += table(
    [
      "width",
      "table",
      "ours ms, fwd / fwd+bwd",
      "ours fwd GB/s",
      "vs our float32 table",
      "vs casting the table first, fwd",
      "vs torch embedding_bag (same dtype)",
    ],
    rows,
  )
  return lines


SMALL_REPORTS = {
  "copy_on_read": render_copy_on_read,
  "optimizer_step": render_optimizer_step,
  "placement": render_placement,
  "main_job_workers": render_main_job_workers,
  "main_job_updates": render_main_job_updates,
  "large_tables_memory": render_large_tables_memory,
  "weighted_lookup": render_weighted_lookup,
  "half_table": render_half_table,
}


def render_report(report):
  """The block of one small report (bench_report.write calls it on what it wrote)."""
  if report["benchmark"] not in SMALL_REPORTS:
    raise RenderError(f"no renderer for a {report['benchmark']!r} report")
  return SMALL_REPORTS[report["benchmark"]](report)


# The document.


def render_blocks(reports):
  kernel = reports.get("kernel", [])
  train = reports.get("train_step", [])
  blocks = {
    "kernel_summary": render_kernel_summary(kernel),
    "kernel_targets": render_kernel_targets(kernel),
    "train_step": render_train_step(train),
    "train_step_targets": render_train_step_targets(train, kernel),
  }
  for name, render_one in SMALL_REPORTS.items():
    report = single_report(reports, name)
    blocks[name] = [NOT_MEASURED] if report is None else render_one(report)
  return blocks


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
