"""Writes a PEP 427 wheel deterministically: sorted entries, fixed timestamps and permissions.

Two builds of the same inputs give identical bytes, so the wheel can be cached and verified by
hash. The build fails if the version Bazel names the wheel with differs from the package's own
`__version__`.
"""

import argparse
import base64
import hashlib
import os
import re
import zipfile

_EPOCH = (1980, 1, 1, 0, 0, 0)  # The earliest time a zip entry can carry.


def _record_hash(data):
  digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
  return "sha256=" + digest.decode()


def _write(archive, name, data, executable=False):
  info = zipfile.ZipInfo(name, date_time=_EPOCH)
  info.compress_type = zipfile.ZIP_DEFLATED
  info.external_attr = (0o100755 if executable else 0o100644) << 16
  info.create_system = 3  # Unix, so the permission bits above are honoured.
  archive.writestr(info, data)


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--output", required=True)
  parser.add_argument("--name", required=True)
  parser.add_argument("--version", required=True)
  parser.add_argument("--version_file", required=True, help="Module holding __version__.")
  parser.add_argument("--platform_tag", required=True)
  parser.add_argument("--summary", required=True)
  parser.add_argument("--requires_python", required=True)
  parser.add_argument("--description_file", required=True)
  parser.add_argument("files", nargs="+", help="SOURCE=PATH_IN_WHEEL pairs.")
  args = parser.parse_args()

  with open(args.version_file, encoding="utf-8") as f:
    version = re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)
  if version != args.version:
    raise SystemExit(
      f"{args.version_file} says __version__ = {version!r} but the build says "
      f"{args.version!r}; update tools/wheel/version.bzl or the package."
    )
  with open(args.description_file, encoding="utf-8") as f:
    description = f.read()

  entries = {}
  for pair in args.files:
    source, name = pair.split("=", 1)
    with open(source, "rb") as f:
      entries[name] = (f.read(), name.endswith(".so"))

  dist_info = f"{args.name}-{version}.dist-info"
  entries[f"{dist_info}/METADATA"] = (
    "\n".join(
      [
        "Metadata-Version: 2.1",
        f"Name: {args.name.replace('_', '-')}",
        f"Version: {version}",
        f"Summary: {args.summary}",
        "License: Apache-2.0",
        f"Requires-Python: {args.requires_python}",
        "Description-Content-Type: text/markdown",
        "",
        description,
      ]
    ).encode(),
    False,
  )
  entries[f"{dist_info}/WHEEL"] = (
    "\n".join(
      [
        "Wheel-Version: 1.0",
        "Generator: distributed_embeddings tools/wheel/build_wheel.py",
        "Root-Is-Purelib: false",
        f"Tag: py3-none-{args.platform_tag}",
        "",
      ]
    ).encode(),
    False,
  )
  record_lines = [
    f"{name},{_record_hash(data)},{len(data)}" for name, (data, _) in sorted(entries.items())
  ]
  record_lines.append(f"{dist_info}/RECORD,,")
  entries[f"{dist_info}/RECORD"] = (("\n".join(record_lines) + "\n").encode(), False)

  os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
  with zipfile.ZipFile(args.output, "w") as archive:
    for name in sorted(entries):
      data, executable = entries[name]
      _write(archive, name, data, executable)


if __name__ == "__main__":
  main()
