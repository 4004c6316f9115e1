"""Workers as separate processes over gRPC, started by distributed_embeddings.launch."""

import os
import subprocess
import sys
import time

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

from distributed_embeddings.python.parallel import communicator as comm_lib
import dist_case
import test_util

_WORKER = os.path.join(os.path.dirname(os.path.abspath(dist_case.__file__)), "dist_worker.py")


def _launch(n, *args, timeout=300):
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p),
             TF_CPP_MIN_LOG_LEVEL="3")
  env.pop("PYTHONSAFEPATH", None)
  return subprocess.run([sys.executable, "-m", "distributed_embeddings.launch", "-n", str(n),
                         _WORKER, *args], env=env, capture_output=True, text=True,
                        timeout=timeout)


class MultiProcessTest(test_util.TestCase):

  @parameterized.parameters(2, 4)
  def test_keras_fit_matches_one_worker(self, n):
    out = self.create_tempdir().full_path
    result = _launch(n, "--out", out, "--mode", "fit")
    self.assertEqual(0, result.returncode, result.stdout + result.stderr)
    self.assertIn("[rank 1]", result.stdout)
    ref_tables, ref_kernel = dist_case.fit(comm_lib.Communicator(0, 1))
    for rank in range(n):
      saved = np.load(os.path.join(out, f"rank{rank}.npz"))
      self.assertAllClose(ref_kernel, saved["kernel"], rtol=1e-5, atol=1e-6)
      for t, ref in enumerate(ref_tables):
        self.assertAllClose(ref, saved[f"arr_{t}"], rtol=1e-5, atol=1e-6)
      # The launcher tells each worker its index on this host (it picks the worker's GPU).
      self.assertEqual(rank, int(saved["local_rank"]))

  @parameterized.parameters(2, 4)
  def test_every_mode_matches_one_worker(self, n):
    out = self.create_tempdir().full_path
    result = _launch(n, "--out", out, "--mode", "modes")
    self.assertEqual(0, result.returncode, result.stdout + result.stderr)
    local = dist_case.GLOBAL_BATCH // n
    saved = [np.load(os.path.join(out, f"rank{rank}.npz")) for rank in range(n)]
    for name, mode in dist_case.MODES.items():
      for id_format, combiner in (("dense", "sum"), ("ragged", "mean")):
        outs, tables = dist_case.train_worker(comm_lib.Communicator(0, 1), mode, combiner,
                                              id_format=id_format)
        for rank in range(n):
          for k, ref in enumerate(outs):
            self.assertAllClose(ref[rank * local:(rank + 1) * local],
                                saved[rank][f"{name}/{id_format}/{k}"], rtol=1e-5, atol=1e-6)
          for k, ref in enumerate(tables, start=len(outs)):
            self.assertAllClose(ref, saved[rank][f"{name}/{id_format}/{k}"], rtol=1e-5,
                                atol=1e-6)

  def test_dead_worker_stops_the_run_quickly(self):
    start = time.monotonic()
    result = _launch(2, "--out", self.create_tempdir().full_path, "--mode", "crash", timeout=120)
    self.assertEqual(3, result.returncode)
    self.assertIn("worker 1 exited with code 3", result.stderr)
    self.assertLess(time.monotonic() - start, 60)

  def test_killed_worker_then_backup_and_restore_loses_nothing(self):
    out = self.create_tempdir().full_path
    start = time.monotonic()
    crashed = _launch(2, "--out", out, "--mode", "backup", "--crash_once")
    self.assertEqual(3, crashed.returncode, crashed.stdout + crashed.stderr)
    self.assertIn("worker 1 exited with code 3", crashed.stderr)
    self.assertLess(time.monotonic() - start, 120)
    self.assertTrue(os.path.exists(os.path.join(out, "backup", "checkpoint.npz")))

    resumed = _launch(2, "--out", out, "--mode", "backup", "--crash_once")
    self.assertEqual(0, resumed.returncode, resumed.stdout + resumed.stderr)
    self.assertNotIn("Epoch 1/4", resumed.stdout)  # it started from the epoch-2 backup
    self.assertIn("Epoch 3/4", resumed.stdout)
    # Bit for bit what two workers reach without the crash, and what one worker reaches.
    straight = self.create_tempdir().full_path
    self.assertEqual(0, _launch(2, "--out", straight, "--mode", "backup").returncode)
    ref_tables, ref_kernel = dist_case.fit(comm_lib.Communicator(0, 1), epochs=4,
                                           optimizer="adagrad")
    for rank in range(2):
      saved = np.load(os.path.join(out, f"rank{rank}.npz"))
      uninterrupted = np.load(os.path.join(straight, f"rank{rank}.npz"))
      for key in saved.files:
        np.testing.assert_array_equal(uninterrupted[key], saved[key], err_msg=key)
      self.assertAllClose(ref_kernel, saved["kernel"], rtol=1e-5, atol=1e-6)
      for t, ref in enumerate(ref_tables):
        self.assertAllClose(ref, saved[f"arr_{t}"], rtol=1e-5, atol=1e-6)


if __name__ == "__main__":
  absltest.main()
