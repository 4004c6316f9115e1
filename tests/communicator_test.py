"""Tests of the collective communicator with 2 and 4 workers as threads on logical devices."""

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np
import tensorflow as tf

from distributed_embeddings.python.parallel import communicator as comm_lib
import test_util

comm_lib.configure_logical_devices(4)


def _value(rank, shape=(4, 3)):
  return np.arange(np.prod(shape), dtype=np.float32).reshape(shape) + 100 * rank


class CommunicatorTest(test_util.TestCase):
  @parameterized.parameters(1, 2, 4)
  def test_collectives_match_numpy(self, n):
    def work(comm):
      x = tf.constant(_value(comm.rank))
      chunks = tf.constant(np.stack([_value(comm.rank) + 10 * w for w in range(n)]))
      return (
        comm.all_reduce(x).numpy(),
        comm.all_gather(x).numpy(),
        comm.all_to_all(chunks).numpy(),
        comm.broadcast(x, root=n - 1).numpy(),
      )

    results = comm_lib.run_in_threads(n, work)
    for rank, (reduced, gathered, exchanged, broadcast) in enumerate(results):
      self.assertAllClose(sum(_value(w) for w in range(n)), reduced)
      self.assertAllClose(np.concatenate([_value(w) for w in range(n)]), gathered)
      self.assertAllClose(np.stack([_value(w) + 10 * rank for w in range(n)]), exchanged)
      self.assertAllClose(_value(n - 1), broadcast)

  @parameterized.parameters(1, 2, 4)
  def test_broadcast_object(self, n):
    # Root's object, whatever the others hold, including payloads of different sizes.
    def work(comm):
      mine = {"seed": 7 * comm.rank + 1, "ids": list(range(comm.rank * 5))}
      return comm.broadcast_object(mine, root=n - 1), comm.broadcast_object(comm.rank)

    for got, rank_zero in comm_lib.run_in_threads(n, work):
      self.assertEqual({"seed": 7 * (n - 1) + 1, "ids": list(range((n - 1) * 5))}, got)
      self.assertEqual(0, rank_zero)

  @parameterized.parameters(2, 4)
  def test_gradients_in_tf_function(self, n):
    def work(comm):
      x = tf.Variable(np.stack([_value(comm.rank) * (w + 1) for w in range(n)]))

      @tf.function
      def step():
        with tf.GradientTape() as tape:
          y = comm.all_to_all(x)
          z = comm.all_gather(y * y)
          loss = tf.reduce_sum(comm.all_reduce(z)) * (comm.rank + 1)
        return tape.gradient(loss, x)

      step()  # traced once, run twice: instance keys are reused with the same shapes
      return step().numpy(), x.numpy()

    results = comm_lib.run_in_threads(n, work)
    # loss_r = (r + 1) * sum over workers of all_reduce(all_gather(y_w^2)) -> total weight
    # sum_r (r + 1) * n on every y element; dL/dy = 2 y c, and all_to_all routes it back.
    c = n * sum(r + 1 for r in range(n))
    for rank, (grad, x) in enumerate(results):
      self.assertAllClose(2 * c * x, grad)

  @parameterized.parameters(2, 4)
  def test_all_gather_v_with_sizes_changing_every_step(self, n):
    # Sizes per (step, rank), including empty pieces and sizes that cross powers of two.
    sizes = np.random.default_rng(n).integers(0, 40, size=(6, n))
    sizes[1] = 0
    sizes[2, 0] = 0

    def piece(step, rank):
      return np.arange(sizes[step, rank] * 2, dtype=np.int64).reshape(-1, 2) + 1000 * rank + step

    def work(comm):
      traced = tf.function(comm.all_gather_v, input_signature=[tf.TensorSpec([None, 2], tf.int64)])
      eager = [comm.all_gather_v(tf.constant(piece(s, comm.rank))).numpy() for s in range(6)]
      graph = [traced(tf.constant(piece(s, comm.rank))).numpy() for s in range(6)]
      return eager, graph

    for eager, graph in comm_lib.run_in_threads(n, work):
      for step in range(6):
        expected = np.concatenate([piece(step, w) for w in range(n)])
        self.assertAllEqual(expected, eager[step])
        self.assertAllEqual(expected, graph[step])

  @parameterized.parameters(False, True)
  def test_all_to_all_v_and_its_gradient(self, traced):
    n = 4
    rng = np.random.default_rng(5)
    steps = 3
    # rows[step, sender, receiver]: block sizes, empty blocks included.
    rows = rng.integers(0, 6, size=(steps, n, n))

    def block(step, sender, receiver):
      return (
        np.arange(rows[step, sender, receiver] * 3, dtype=np.float32).reshape(-1, 3)
        + 100 * sender
        + 10 * receiver
        + 1000 * step
      )

    def work(comm):
      def step_fn(*chunks):
        with tf.GradientTape() as tape:
          tape.watch(chunks)
          received = comm.all_to_all_v(list(chunks))
          # Weight what arrives from worker w by (w + 1) * (rank + 1).
          loss = sum(tf.reduce_sum(r) * (w + 1) * (comm.rank + 1) for w, r in enumerate(received))
        return received, tape.gradient(loss, chunks)

      # One trace for every step: workers must trace alike, since keys are taken when tracing.
      signature = [tf.TensorSpec([None, 3], tf.float32)] * n
      fn = tf.function(step_fn, input_signature=signature) if traced else step_fn
      out = []
      for step in range(steps):
        chunks = [tf.constant(block(step, comm.rank, w)) for w in range(n)]
        received, grads = fn(*chunks)
        out.append(([r.numpy() for r in received], [g.numpy() for g in grads]))
      return out

    for rank, per_step in enumerate(comm_lib.run_in_threads(n, work)):
      for step, (received, grads) in enumerate(per_step):
        for w in range(n):
          self.assertAllEqual(block(step, w, rank), received[w])
          # What this worker sent to w is weighted on w by (rank + 1) * (w + 1).
          self.assertAllEqual(np.full_like(block(step, rank, w), (rank + 1) * (w + 1)), grads[w])

  def test_all_to_all_v_needs_one_chunk_per_worker(self):
    comm = comm_lib.Communicator(0, 2)  # fails before any collective starts
    with self.assertRaisesRegex(ValueError, r"all_to_all_v: expected 2 chunks; got 3"):
      comm.all_to_all_v([tf.zeros([1, 2])] * 3)

  def test_eager_instance_keys_stay_bounded(self):
    def work(comm):
      before = comm._next_key  # pylint: disable=protected-access
      for step in range(50):
        comm.all_reduce(tf.fill([3], float(step)))
        comm.all_gather_v(tf.zeros([step % 7, 2], tf.int32))
      return comm._next_key - before  # pylint: disable=protected-access

    used = comm_lib.run_in_threads(2, work)
    # One key for the all-reduce, one for the size exchange, one block for the padded gather.
    self.assertEqual(used[0], used[1])
    self.assertLessEqual(used[0], 2 + comm_lib.SIZE_CLASSES)

  def test_size_classes_pad_little_and_agree_with_python(self):
    sizes = list(range(0, 70)) + [127, 128, 129, 1000, 4095, 4096, 4097, 6000, 10**6, 2**40]
    classes = [comm_lib.size_class(n) for n in sizes]
    padded = [int(p) for _, p in classes]
    self.assertEqual([comm_lib.padded_size(n) for n in sizes], padded)
    for n, p in zip(sizes, padded):
      self.assertGreaterEqual(p, n)
      self.assertLessEqual(p, max(n * 1.125, 16))
    # One class per padded size, within [0, SIZE_CLASSES).
    by_class = {}
    for (index, _), p in zip(classes, padded):
      by_class.setdefault(int(index), set()).add(p)
    self.assertTrue(all(len(v) == 1 for v in by_class.values()))
    self.assertLess(max(by_class), comm_lib.SIZE_CLASSES)

  def test_sites_keep_keys_when_workers_retrace_differently(self):
    # Worker 0 sees three batch sizes (three traces of one tf.function), worker 1 one size: with
    # a site, both use the same instance keys, and the shapes padded to a size class.
    batches = {0: [3, 5, 20, 3], 1: [4, 4, 4, 4]}
    owner = object.__new__(type("Owner", (), {}))

    def work(comm):
      comm.reserve_keys_for(owner, {"sum#0": comm_lib.SIZE_CLASSES, "largest#0": 1})

      def total(x):
        largest = comm.all_reduce_max(tf.shape(x, tf.int64)[0], site=comm.site(owner, "largest"))
        index, padded = comm_lib.size_class(largest)
        summed = comm.all_reduce(
          comm_lib.pad_rows(x, padded), size_class=index, site=comm.site(owner, "sum")
        )
        return tf.reduce_sum(summed)

      traced = tf.function(total, reduce_retracing=False)
      return [float(traced(tf.ones([n, 2]))) for n in batches[comm.rank]]

    for got in comm_lib.run_in_threads(2, work, timeout=60):
      self.assertEqual([2.0 * (a + b) for a, b in zip(batches[0], batches[1])], got)

  @parameterized.parameters(2, 4)
  def test_broadcast_to_receivers_that_hold_nothing(self, n):
    shape = (3000, 700)  # 8 MiB of float32: several pieces

    def work(comm):
      root = n - 1
      mine = tf.constant(_value(comm.rank, shape)) if comm.rank == root else None
      got = comm.broadcast(mine, root, shape=shape, dtype=tf.float32).numpy()
      variable = tf.Variable(_value(comm.rank, shape))
      comm.broadcast_variable(variable, root)
      return got, variable.numpy()

    for got, variable in comm_lib.run_in_threads(n, work):
      self.assertAllEqual(_value(n - 1, shape), got)
      self.assertAllEqual(_value(n - 1, shape), variable)

  def test_timeout_must_be_a_number_of_seconds(self):
    for bad in (-1, "5", True):
      with self.assertRaisesRegex(ValueError, "'timeout' must be None or a number of seconds"):
        comm_lib.Communicator(0, 2, timeout=bad)


class WorkerPlacementTest(absltest.TestCase):
  def test_local_rank_prefers_the_most_specific_variable(self):
    local_rank = comm_lib.local_rank
    self.assertEqual(5, local_rank(5, {}))
    self.assertEqual(5, local_rank(5, {"DE_LOCAL_RANK": ""}))
    self.assertEqual(2, local_rank(5, {"OMPI_COMM_WORLD_LOCAL_RANK": "2"}))
    self.assertEqual(1, local_rank(5, {"LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_RANK": "2"}))
    self.assertEqual(0, local_rank(5, {"DE_LOCAL_RANK": "0", "LOCAL_RANK": "1"}))

  def test_local_rank_rejects_a_value_that_is_not_an_index(self):
    for value in ("one", "-1", "1.5"):
      with self.assertRaisesRegex(ValueError, f"LOCAL_RANK must be a worker index; got '{value}'"):
        comm_lib.local_rank(0, {"LOCAL_RANK": value})

  def test_each_worker_takes_a_gpu_by_local_rank(self):
    placement = comm_lib.worker_placement
    self.assertEqual((None, "CPU:0", "auto"), placement(3, 0, {}))
    # Four workers on a host with 4 GPUs: one each; with 2 GPUs, round robin.
    self.assertEqual([0, 1, 2, 3], [placement(r, 4, {})[0] for r in range(4)])
    self.assertEqual([0, 1, 0, 1], [placement(r, 2, {})[0] for r in range(4)])
    # A second host's workers (global ranks 4..7) count from 0 by their local rank.
    self.assertEqual((2, "GPU:0", "nccl"), placement(6, 4, {"DE_LOCAL_RANK": "2"}))


if __name__ == "__main__":
  absltest.main()
