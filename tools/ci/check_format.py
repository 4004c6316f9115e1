"""Checks that the tree is formatted: clang-format (.clang-format) on C++ and CUDA, ruff format
and ruff check (ruff.toml) on Python. Both tools are pinned in tools/bootstrap/requirements.txt.

Writes a JUnit XML with one test case per check, so the test suite counts them:
  .venv/bin/python3 tools/ci/check_format.py [XML]
To fix: .venv/bin/clang-format -i FILES; .venv/bin/ruff format .
"""

import os
import subprocess
import sys
import xml.etree.ElementTree as ET

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)


def _tracked(*patterns):
  out = subprocess.run(
    ["git", "ls-files", "--", *patterns], cwd=REPO, check=True, capture_output=True, text=True
  ).stdout
  return [path for path in out.splitlines() if os.path.exists(os.path.join(REPO, path))]


def _clang_format():
  unformatted = []
  for path in _tracked("*.cc", "*.h", "*.cu"):
    result = subprocess.run(
      [os.path.join(BIN, "clang-format"), "--dry-run", "-Werror", path],
      cwd=REPO,
      capture_output=True,
      text=True,
    )
    if result.returncode != 0:
      unformatted.append(path)
  return unformatted


def _ruff(*args):
  result = subprocess.run(
    [os.path.join(BIN, "ruff"), *args], cwd=REPO, capture_output=True, text=True
  )
  return [] if result.returncode == 0 else [(result.stdout + result.stderr).strip()]


CHECKS = {
  "clang_format": _clang_format,
  "ruff_format": lambda: _ruff("format", "--check", "."),
  "ruff_check": lambda: _ruff("check", "."),
}


def main(argv):
  suite = ET.Element("testsuite", name="format")
  failed = 0
  for name, check in CHECKS.items():
    case = ET.SubElement(suite, "testcase", classname="format", name=name)
    problems = check()
    if problems:
      failed += 1
      ET.SubElement(case, "failure", message=f"{name}: not formatted").text = "\n".join(problems)
      print(f"[format] {name} FAILED:\n  " + "\n  ".join(problems), file=sys.stderr)
    else:
      print(f"[format] {name} ok", file=sys.stderr)
  if len(argv) > 1:
    ET.ElementTree(suite).write(argv[1], encoding="utf-8", xml_declaration=True)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
