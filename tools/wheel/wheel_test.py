"""Tests of the wheel: it installs into a fresh venv and works from outside the repository, and
packing the same files twice gives the same bytes."""

import glob
import hashlib
import base64
import os
import subprocess
import sys
import sysconfig
import zipfile

from absl.testing import absltest

_RUNFILES = os.path.join(os.environ["TEST_SRCDIR"], os.environ["TEST_WORKSPACE"])


def _wheel_path():
  (path,) = glob.glob(os.path.join(_RUNFILES, "tools/wheel/dist/*.whl"))
  return path


class WheelTest(absltest.TestCase):
  def test_installs_into_fresh_venv_and_works_outside_the_repo(self):
    tmp = self.create_tempdir().full_path
    venv = os.path.join(tmp, "venv")
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    python = os.path.join(venv, "bin", "python")
    # TensorFlow 2.21 comes from the project's venv through a .pth file: the wheel itself must
    # bring everything else (the op library included).
    site = subprocess.run(
      [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
      check=True,
      capture_output=True,
      text=True,
    ).stdout.strip()
    with open(os.path.join(site, "project_tensorflow.pth"), "w", encoding="utf-8") as f:
      f.write(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
      [python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", _wheel_path()], check=True
    )
    script = (
      "import distributed_embeddings as de, tensorflow as tf\n"
      "print(de.embedding_lookup)\n"
      "print(de.__file__)\n"
      "out = de.embedding_lookup(tf.eye(4), tf.constant([[1, 2], [3, 3]]), combiner='sum')\n"
      "print(out.numpy().tolist())\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    result = subprocess.run(
      [python, "-c", script], cwd=tmp, env=env, check=True, capture_output=True, text=True
    )
    lines = result.stdout.strip().splitlines()
    self.assertIn("function embedding_lookup", lines[0])
    self.assertTrue(lines[1].startswith(venv), lines[1])
    self.assertEqual("[[0.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 2.0]]", lines[2])

  def test_record_lists_every_file_with_its_hash(self):
    with zipfile.ZipFile(_wheel_path()) as wheel:
      names = set(wheel.namelist())
      (record_name,) = [n for n in names if n.endswith(".dist-info/RECORD")]
      rows = [line.split(",") for line in wheel.read(record_name).decode().splitlines()]
      self.assertEqual(names, {row[0] for row in rows})
      self.assertIn("distributed_embeddings/python/ops/_embedding_ops.so", names)
      self.assertFalse([n for n in names if "libtensorflow_framework" in n])
      for name, digest, size in rows:
        if name == record_name:
          continue
        data = wheel.read(name)
        expected = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        self.assertEqual(f"sha256={expected}", digest, name)
        self.assertEqual(len(data), int(size), name)

  def test_packing_twice_gives_identical_bytes(self):
    tmp = self.create_tempdir()
    module = tmp.create_file("pkg/__init__.py", '__version__ = "1.2.3"\n')
    library = tmp.create_file("pkg/_lib.so", "binary")
    readme = tmp.create_file("README.md", "# pkg")
    outputs = []
    for i, order in enumerate([(module, library), (library, module)]):
      output = os.path.join(tmp.full_path, f"out{i}", "pkg-1.2.3-py3-none-linux_x86_64.whl")
      subprocess.run(
        [
          sys.executable,
          os.path.join(_RUNFILES, "tools/wheel/build_wheel.py"),
          "--output",
          output,
          "--name",
          "pkg",
          "--version",
          "1.2.3",
          "--version_file",
          module.full_path,
          "--platform_tag",
          "linux_x86_64",
          "--summary",
          "s",
          "--requires_python",
          ">=3.9",
          "--description_file",
          readme.full_path,
        ]
        + [f"{f.full_path}={os.path.relpath(f.full_path, tmp.full_path)}" for f in order],
        check=True,
      )
      with open(output, "rb") as f:
        outputs.append(f.read())
    self.assertEqual(outputs[0], outputs[1])

  def test_version_mismatch_fails_the_build(self):
    tmp = self.create_tempdir()
    module = tmp.create_file("pkg/__init__.py", '__version__ = "1.2.3"\n')
    readme = tmp.create_file("README.md", "# pkg")
    result = subprocess.run(
      [
        sys.executable,
        os.path.join(_RUNFILES, "tools/wheel/build_wheel.py"),
        "--output",
        os.path.join(tmp.full_path, "x.whl"),
        "--name",
        "pkg",
        "--version",
        "9.9.9",
        "--version_file",
        module.full_path,
        "--platform_tag",
        "linux_x86_64",
        "--summary",
        "s",
        "--requires_python",
        ">=3.9",
        "--description_file",
        readme.full_path,
        f"{module.full_path}=pkg/__init__.py",
      ],
      capture_output=True,
      text=True,
    )
    self.assertNotEqual(0, result.returncode)
    self.assertIn("__version__ = '1.2.3' but the build says '9.9.9'", result.stderr)


if __name__ == "__main__":
  absltest.main()
