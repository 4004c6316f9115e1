"""Training saved mid-way and resumed in a fresh process continues bit for bit."""

import os
import subprocess
import sys
import textwrap

from absl.testing import absltest
import numpy as np
import tensorflow as tf

import checkpoint_case
import test_util


class CheckpointTest(test_util.TestCase):
  def test_resume_in_a_fresh_process_is_bit_identical(self):
    tmp = self.create_tempdir().full_path
    model, optimizer = checkpoint_case.build()
    checkpoint_case.train(model, optimizer, range(0, 4))
    path = tf.train.Checkpoint(model=model, optimizer=optimizer).save(os.path.join(tmp, "ckpt"))
    checkpoint_case.train(model, optimizer, range(4, 8))
    expected = checkpoint_case.state(model, optimizer)

    script = textwrap.dedent(f"""
        import numpy as np, tensorflow as tf
        import checkpoint_case
        model, optimizer = checkpoint_case.build()
        tf.train.Checkpoint(model=model, optimizer=optimizer).restore({path!r}).assert_consumed()
        checkpoint_case.train(model, optimizer, range(4, 8))
        np.savez({tmp!r} + "/resumed.npz", *checkpoint_case.state(model, optimizer))
        """)
    env = dict(
      os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p), TF_CPP_MIN_LOG_LEVEL="3"
    )
    env.pop("PYTHONSAFEPATH", None)
    subprocess.run([sys.executable, "-c", script], check=True, env=env)
    resumed = np.load(os.path.join(tmp, "resumed.npz"))
    self.assertLen(resumed.files, len(expected))
    for i, value in enumerate(expected):
      np.testing.assert_array_equal(value, resumed[f"arr_{i}"])
    self.assertGreater(int(expected[0][0]), 50)  # the vocabulary did grow during training


if __name__ == "__main__":
  absltest.main()
