"""The op library built with --config=cuda registers its GPU kernels as designed, under whichever
TensorFlow loads it (tensorflow-cpu in the cuda pass, the full tensorflow wheel in
tools/ci/gpu_tf_suite.sh): every lookup op on the GPU for each table, id and split type, the
scalars and resource handles its kernels read on the host in host memory, and the ops with no GPU
kernel (the sparse optimizer updates, the vocabulary state helpers) on the CPU only. No GPU is
needed: this reads the kernel registry.
"""

from absl.testing import absltest
import tensorflow as tf
from tensorflow.python.framework import kernels

import distributed_embeddings as de  # loads the op library
from distributed_embeddings.python.parallel import communicator as comm_lib

# (table dtype, output dtype): half tables give their own dtype or float32.
TABLE_OUTPUT_TYPES = {
  ("float32", "float32"),
  ("float64", "float64"),
  ("float16", "float16"),
  ("float16", "float32"),
  ("bfloat16", "bfloat16"),
  ("bfloat16", "float32"),
}
ID_TYPES = {"int32", "int64"}

# op: (the attr naming its table type, or None; host-memory arguments of its GPU kernels).
GPU_OPS = {
  "DePooledEmbeddingLookup": ("T", set()),
  "DeResourcePooledEmbeddingLookup": ("dtype", {"resource"}),
  "DePooledEmbeddingLookupGrad": ("T", {"num_rows"}),
  "DeWeightedPooledEmbeddingLookup": ("T", set()),
  "DeResourceWeightedPooledEmbeddingLookup": ("dtype", {"resource"}),
  "DeWeightedPooledEmbeddingLookupGrad": ("T", {"num_rows"}),
  "DeSparseRowSplits": (None, {"dense_shape"}),
  "DeIntegerLookup": (None, {"state"}),
}
CPU_ONLY_OPS = [
  "DeSparseApplySgd",
  "DeSparseApplyAdagrad",
  "DeSparseApplyRowwiseAdagrad",
  "DeSparseApplyLazyAdam",
  "DeInitialIntegerLookupState",
  "DeValidateIntegerLookupState",
]


def _constraints(kernel):
  """{attr: set of allowed dtype names} of one registered kernel."""
  return {
    c.name: {tf.as_dtype(t).name for t in c.allowed_values.list.type} for c in kernel.constraint
  }


class GpuRegistrationTest(absltest.TestCase):
  def _kernels(self, op, device):
    return [k for k in kernels.get_registered_kernels_for_op(op).kernel if k.device_type == device]

  def test_lookup_ops_register_gpu_kernels_for_every_type(self):
    for op, (table_attr, host_memory) in GPU_OPS.items():
      with self.subTest(op=op):
        gpu = self._kernels(op, "GPU")
        self.assertNotEmpty(gpu, f"{op} has no GPU kernel")
        for kernel in gpu:
          self.assertEqual(set(kernel.host_memory_arg), host_memory, op)
        if table_attr is None:
          continue
        combos = set()
        for kernel in gpu:
          types = _constraints(kernel)
          combos.add(
            (
              next(iter(types[table_attr])),
              next(iter(types["Tout"])),
              next(iter(types["Tindices"])),
              next(iter(types["Tsplits"])),
            )
          )
        expected = {(t, o, i, s) for t, o in TABLE_OUTPUT_TYPES for i in ID_TYPES for s in ID_TYPES}
        self.assertEqual(combos, expected, op)
        # The CPU has the same kernels.
        self.assertLen(self._kernels(op, "CPU"), len(gpu), op)

  def test_ops_without_a_gpu_kernel_stay_on_the_cpu(self):
    for op in CPU_ONLY_OPS:
      with self.subTest(op=op):
        self.assertEmpty(self._kernels(op, "GPU"), f"{op} unexpectedly has a GPU kernel")
        self.assertNotEmpty(self._kernels(op, "CPU"), f"{op} has no CPU kernel")

  def test_gpu_workers_trace_nccl_collectives_on_their_gpu(self):
    # What init_from_env sets up for worker 1 of 2 on a host with two GPUs: GPU 1 (visible to it
    # as GPU:0) and NCCL collectives there. Traced, not run: no GPU or cluster is needed.
    gpu_index, device, hint = comm_lib.worker_placement(1, 2, {})
    self.assertEqual((1, "GPU:0", "nccl"), (gpu_index, device, hint))
    comm = comm_lib.Communicator(1, 2, device=device, communication_hint=hint)

    @tf.function
    def step(x):
      return comm.all_reduce(x), comm.all_gather(x), comm.all_to_all(x), comm.broadcast(x)

    graph = step.get_concrete_function(tf.TensorSpec([4, 2], tf.float32)).graph
    collectives = [op for op in graph.get_operations() if op.type.startswith("Collective")]
    self.assertContainsSubset(
      {"CollectiveReduceV2", "CollectiveGatherV2", "CollectiveAllToAllV2"},
      {op.type for op in collectives},
    )
    for op in collectives:
      self.assertEqual(b"nccl", op.get_attr("communication_hint"), op.type)
      self.assertIn("GPU:0", op.device, op.type)
    # A CPU host keeps the workers on their CPUs and lets TensorFlow choose (gRPC ring).
    self.assertEqual((None, "CPU:0", "auto"), comm_lib.worker_placement(1, 0, {}))

  def test_lookups_run_on_the_cpu_of_this_tensorflow(self):
    # The same library's CPU kernels, in this TensorFlow build.
    table = tf.constant([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    ids = tf.ragged.constant([[0, 2], [1]], dtype=tf.int64)
    weights = tf.ragged.constant([[0.5, 2.0], [3.0]])
    self.assertEqual(
      de.embedding_lookup(table, ids, "sum", weights=weights).numpy().tolist(),
      [[10.5, 13.0], [9.0, 12.0]],
    )
    half = de.embedding_lookup(tf.cast(table, tf.bfloat16), ids, "sum", output_dtype=tf.float32)
    self.assertEqual(half.numpy().tolist(), [[6.0, 8.0], [3.0, 4.0]])


if __name__ == "__main__":
  absltest.main()
