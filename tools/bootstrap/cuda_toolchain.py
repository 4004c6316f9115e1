"""Installs the pinned CUDA 12 wheels of requirements-cuda.txt as one CUDA root.

NVIDIA's PyPI wheels split a toolkit over several packages (nvidia/cuda_runtime/include,
nvidia/cuda_cccl/include, ...). Clang's CUDA driver, and //third_party/cuda:cuda_configure.bzl, want
the usual layout instead, so this moves their files into:

  <dest>/include/          runtime, CCCL, crt and nvFatbin headers
  <dest>/bin/ptxas
  <dest>/nvvm/libdevice/libdevice.10.bc
  <dest>/lib64/            libcudart.so.12, libnvfatbin.so.12
  <dest>/version.txt       the pins, and a stamp: nothing is reinstalled while they are unchanged

Usage: cuda_toolchain.py REQUIREMENTS DEST (run with the project venv's python, which has pip).
"""

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile

# Package folder inside the wheels -> the subfolders of it that go into the CUDA root.
_LAYOUT = {
  "cuda_runtime": ["include", "lib"],
  "cuda_cccl": ["include"],
  "cuda_nvcc": ["include", "bin", "nvvm"],
  "nvfatbin": ["include", "lib"],
}


def _merge(src, dst):
  """Moves the files under src into dst (folders merged), skipping the wheels' __init__.py."""
  for dirpath, dirnames, filenames in os.walk(src):
    dirnames[:] = [d for d in dirnames if d != "__pycache__"]
    rel = os.path.relpath(dirpath, src)
    for name in filenames:
      if name == "__init__.py":
        continue
      target_dir = os.path.join(dst, rel)
      os.makedirs(target_dir, exist_ok=True)
      target = os.path.join(target_dir, name)
      if os.path.exists(target):
        raise SystemExit(f"cuda_toolchain: two wheels ship {os.path.join(rel, name)}")
      shutil.move(os.path.join(dirpath, name), target)


def main(argv):
  if len(argv) != 3:
    raise SystemExit(__doc__)
  requirements, dest = argv[1], os.path.abspath(argv[2])
  with open(requirements, "rb") as f:
    pins = f.read()
  stamp = f"# sha256 {hashlib.sha256(pins).hexdigest()}\n"
  version_file = os.path.join(dest, "version.txt")
  if os.path.exists(version_file):
    with open(version_file) as f:
      if f.readline() == stamp:
        return 0

  parent = os.path.dirname(dest)
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=".cuda-", dir=parent)
  try:
    wheels = os.path.join(staging, "wheels")
    subprocess.run(
      [
        sys.executable,
        "-m",
        "pip",
        "install",
        "-q",
        "--disable-pip-version-check",
        "--no-deps",
        "--require-hashes",
        "--target",
        wheels,
        "-r",
        requirements,
      ],
      check=True,
    )
    root = os.path.join(staging, "root")
    for package, folders in _LAYOUT.items():
      for folder in folders:
        src = os.path.join(wheels, "nvidia", package, folder)
        if not os.path.isdir(src):
          raise SystemExit(f"cuda_toolchain: nvidia/{package}/{folder} is missing from the wheels")
        _merge(src, os.path.join(root, "lib64" if folder == "lib" else folder))
    os.chmod(os.path.join(root, "bin", "ptxas"), 0o755)
    # Clang's CUDA wrapper headers include this cuRAND header unconditionally; cuRAND is not part
    # of the toolchain and no source of ours uses it, so an empty one stands in.
    open(os.path.join(root, "include", "curand_mtgp32_kernel.h"), "w").close()
    with open(os.path.join(root, "version.txt"), "w") as f:
      f.write(stamp)
      f.write(pins.decode())
    if os.path.exists(dest):
      shutil.rmtree(dest)
    os.rename(root, dest)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
