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

  def test_dead_worker_stops_the_run_quickly(self):
    start = time.monotonic()
    result = _launch(2, "--out", self.create_tempdir().full_path, "--mode", "crash", timeout=120)
    self.assertEqual(3, result.returncode)
    self.assertIn("worker 1 exited with code 3", result.stderr)
    self.assertLess(time.monotonic() - start, 60)


if __name__ == "__main__":
  absltest.main()
