"""Counts test cases across Bazel runs and prints `N passed, N failed, N skipped`.

Bazel's own summary counts targets. This reads each run's build event protocol file (JSON), takes
the test targets it configured, and parses the case-level XML (googletest and absltest both write
it) of the results that run produced, so stale XML from earlier runs is never counted. A test
target with no XML (it failed to build, crashed or timed out) counts as one failed case; a target
skipped as incompatible with the configuration (CUDA tests outside --config=cuda) counts as nothing.

Usage: summarize_tests.py NAME=BEP.json [NAME=xml:TEST.xml ...]
  (an `xml:` entry is a JUnit XML written outside Bazel, such as the fuzzer's)
"""

import collections
import json
import sys
import urllib.parse
import xml.etree.ElementTree as ET


def _case_outcome(case):
  tags = {child.tag for child in case}
  if tags & {"failure", "error"}:
    return "failed"
  if (
    "skipped" in tags
    or case.get("result") in ("skipped", "suppressed")
    or case.get("status") == "notrun"
  ):
    return "skipped"
  return "passed"


def _count_xml(path, counts, failures, label):
  try:
    root = ET.parse(path).getroot()
  except (OSError, ET.ParseError) as error:
    counts["failed"] += 1
    failures.append(f"{label}: unreadable test.xml ({error})")
    return
  cases = list(root.iter("testcase"))
  if not cases:
    counts["failed"] += 1
    failures.append(f"{label}: no test cases ran")
  for case in cases:
    outcome = _case_outcome(case)
    counts[outcome] += 1
    if outcome == "failed":
      failures.append(f"{label}: {case.get('classname', '')}.{case.get('name')}")


def summarize(bep_path):
  """Returns (Counter of passed/failed/skipped, list of failure descriptions) for one run."""
  test_targets, skipped_targets, results = set(), set(), collections.defaultdict(list)
  failed_targets = set()
  with open(bep_path, encoding="utf-8") as f:
    for line in f:
      event = json.loads(line)
      kind, key = next(iter(event["id"].items()))
      if kind == "targetConfigured" and event.get("configured", {}).get("targetKind", "").endswith(
        "_test rule"
      ):
        test_targets.add(key["label"])
      elif kind == "targetCompleted":
        if event.get("aborted", {}).get("reason") == "SKIPPED":
          skipped_targets.add(key["label"])
        elif not event.get("completed", {}).get("success", False):
          failed_targets.add(key["label"])
      elif kind == "testResult":
        for output in event["testResult"].get("testActionOutput", []):
          if output["name"] == "test.xml":
            results[key["label"]].append(urllib.parse.urlparse(output["uri"]).path)
  counts, failures = collections.Counter(), []
  for label in sorted(test_targets - skipped_targets):
    if results.get(label):
      for path in results[label]:
        _count_xml(path, counts, failures, label)
    else:
      counts["failed"] += 1
      reason = "failed to build" if label in failed_targets else "produced no test.xml"
      failures.append(f"{label}: {reason}")
  return counts, failures


def main(argv):
  total, all_failures = collections.Counter(), []
  for arg in argv[1:]:
    name, _, path = arg.partition("=")
    if path.startswith("xml:"):
      counts, failures = collections.Counter(), []
      _count_xml(path[len("xml:") :], counts, failures, name)
    else:
      counts, failures = summarize(path)
    print(
      f"[{name}] {counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped"
    )
    total.update(counts)
    all_failures += [f"[{name}] {failure}" for failure in failures]
  for failure in all_failures:
    print(f"FAILED {failure}")
  print(f"{total['passed']} passed, {total['failed']} failed, {total['skipped']} skipped")
  return 1 if total["failed"] else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
