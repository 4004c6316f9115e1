"""Workers as separate processes over gRPC, started by distributed_embeddings.launch."""

import json
import os
import subprocess
import sys
import time

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

from distributed_embeddings import launch
from distributed_embeddings.python.parallel import communicator as comm_lib
import dist_case
import dist_worker
import test_util

_WORKER = os.path.join(os.path.dirname(os.path.abspath(dist_case.__file__)), "dist_worker.py")


def _environment(**extra):
  env = dict(
    os.environ,
    PYTHONPATH=os.pathsep.join(p for p in sys.path if p),
    TF_CPP_MIN_LOG_LEVEL="3",
    **extra,
  )
  env.pop("PYTHONSAFEPATH", None)
  return env


def _launch(n, *args, timeout=300):
  return subprocess.run(
    [sys.executable, "-m", "distributed_embeddings.launch", "-n", str(n), _WORKER, *args],
    env=_environment(),
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def _spawn_workers(n, out, *args, env=None, kill_after=120):
  """Starts `n` workers with TF_CONFIG as a cluster manager would, without our launcher; returns
  their exit codes (None for one still running after `kill_after` seconds, then killed) and
  their output."""
  workers = [f"127.0.0.1:{port}" for port in launch.free_ports(n)]
  processes, logs = [], []
  for rank in range(n):
    config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": rank}}
    logs.append(open(os.path.join(out, f"worker{rank}.log"), "w+"))
    processes.append(
      subprocess.Popen(
        [sys.executable, _WORKER, "--out", out, *args],
        env=_environment(TF_CONFIG=json.dumps(config), **(env or {})),
        stdout=logs[-1],
        stderr=subprocess.STDOUT,
      )
    )
  deadline = time.monotonic() + kill_after
  codes = []
  for p in processes:
    try:
      codes.append(p.wait(timeout=max(1, deadline - time.monotonic())))
    except subprocess.TimeoutExpired:
      p.kill()
      p.wait()
      codes.append(None)
  output = []
  for log in logs:
    log.seek(0)
    output.append(log.read()[-3000:])
    log.close()
  return codes, "\n".join(output)


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
  def test_user_patterns_train_like_one_worker(self, n):
    out = self.create_tempdir().full_path
    result = _launch(n, "--out", out, "--mode", "patterns", timeout=900)
    self.assertEqual(0, result.returncode, result.stdout + result.stderr)
    for rank in range(n):
      with open(os.path.join(out, f"rank{rank}.json")) as f:
        report = json.load(f)
      self.assertEqual(sorted(dist_worker.pattern_cases(n)), sorted(report))
      for name, got in report.items():
        # Largest difference, relative to 1 + |reference|, of any output or weight.
        self.assertLess(got["error"], 5e-5, f"{name} on worker {rank}")
        self.assertTrue(got["sharded"], name)

  def test_a_dead_peer_fails_the_others_quickly_without_a_launcher(self):
    # As under a cluster manager: nothing stops worker 0 when worker 1 dies, yet its next
    # collective fails within seconds (the default collective timeout is 30 minutes), with an
    # error that names the dead worker.
    out = self.create_tempdir().full_path
    codes, output = _spawn_workers(
      2, out, "--mode", "peer_dies", env={"DE_PEER_CHECK_SECONDS": "1"}
    )
    self.assertEqual([0, 3], codes, output)
    with open(os.path.join(out, "rank0.json")) as f:
      result = json.load(f)
    self.assertEqual("UnavailableError", result["error"])
    self.assertIn("worker 1 (/job:worker/replica:0/task:1) is gone", result["message"])
    self.assertIn("restart all workers", result["message"])
    self.assertLess(result["seconds"], 30)

  def test_a_hung_peer_fails_the_others_at_the_collective_timeout(self):
    out = self.create_tempdir().full_path
    start = time.monotonic()
    codes, output = _spawn_workers(
      2, out, "--mode", "stuck", env={"DE_COLLECTIVE_TIMEOUT_SECONDS": "3"}, kill_after=60
    )
    self.assertEqual(0, codes[0], output)
    with open(os.path.join(out, "rank0.json")) as f:
      result = json.load(f)
    self.assertEqual("DeadlineExceededError", result["error"])
    self.assertIn("timed out", result["message"])
    self.assertLess(result["seconds"], 20)
    self.assertLess(time.monotonic() - start, 100)

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
    ref_tables, ref_kernel = dist_case.fit(
      comm_lib.Communicator(0, 1), epochs=4, optimizer="adagrad"
    )
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
