"""What the --config=cuda op library carries and links, read from the file itself (no GPU needed).

* Device code for the GPUs TensorFlow 2.21 is built for: in every fat binary of the library's
  .nv_fatbin section, SASS (a CUDA ELF whose own header names the same GPU) for sm_60, sm_70,
  sm_80, sm_89 and sm_90, and PTX for compute_90. Parsed here from the fat binary layout, not by
  the tool that wrote it.
* No CUDA library among its dependencies, so it loads where CUDA is missing; and none of the CUDA
  runtime's C API among its exported symbols, so it never interposes on TensorFlow's runtime.
* Hermetic (clang) builds reach the runtime through the loading stub: under tensorflow-cpu with no
  libcudart.so.12 installed, importing the package loads none (and the CPU kernels work); where
  the nvidia-cuda-runtime-cu12 wheel is installed (tools/ci/gpu_tf_suite.sh), the import loads
  libcudart.so.12 to register the GPU kernels.
"""

import importlib.util
import os
import struct

from absl.testing import absltest
import numpy as np
import tensorflow as tf

import distributed_embeddings as de
from distributed_embeddings.python.ops import embedding_lookup_ops

FATBIN_MAGIC = 0xBA55ED50
KIND_PTX, KIND_ELF = 1, 2
CUDA_ELF_MACHINE = 190
SASS = {60, 70, 80, 89, 90}
PTX = {90}
# The stub's message for a runtime it could not load: only hermetic builds carry it.
STUB_MARKER = b"the CUDA runtime (libcudart.so.12) could not be loaded"


def _op_library_path():
  folder = os.path.dirname(embedding_lookup_ops.__file__)
  return os.path.join(folder, "_embedding_ops.so")


def _elf_sections(data):
  """{name: bytes} of a 64-bit little-endian ELF file."""
  assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1
  (shoff,) = struct.unpack_from("<Q", data, 0x28)
  shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
  headers = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
  names = headers[shstrndx]
  sections = {}
  for name_offset, kind, _, _, offset, size, *_ in headers:
    start = names[4] + name_offset
    name = data[start : data.index(b"\0", start)].decode()
    sections[name] = b"" if kind == 8 else data[offset : offset + size]  # 8: SHT_NOBITS
  return sections


def _fatbin_entries(section):
  """[(kind, sm, payload, flags)] of every image in every fat binary in section, in order."""
  containers = []
  offset = 0
  while offset < len(section):
    magic, version, header_size, size = struct.unpack_from("<IHHQ", section, offset)
    assert magic == FATBIN_MAGIC and version == 1, (hex(magic), version)
    entries = []
    entry = offset + header_size
    end = entry + size
    while entry < end:
      kind, _, entry_header, payload_size = struct.unpack_from("<HHIQ", section, entry)
      (sm,) = struct.unpack_from("<I", section, entry + 0x1C)
      (flags,) = struct.unpack_from("<Q", section, entry + 0x28)
      payload = section[entry + entry_header : entry + entry_header + payload_size]
      entries.append((kind, sm, payload, flags))
      entry += entry_header + payload_size
    assert entry == end, "an image runs past its fat binary"
    containers.append(entries)
    # Fat binaries follow one another 8-byte aligned.
    offset = (end + 7) & ~7
  return containers


class CudaDeviceCodeTest(absltest.TestCase):
  @classmethod
  def setUpClass(cls):
    with open(_op_library_path(), "rb") as f:
      cls.data = f.read()
    cls.sections = _elf_sections(cls.data)

  def test_every_fat_binary_has_sass_and_ptx_for_tensorflows_gpus(self):
    self.assertIn(".nv_fatbin", self.sections, "the op library carries no device code")
    containers = _fatbin_entries(self.sections[".nv_fatbin"])
    # One per CUDA source with GPU op kernels: the lookups and the integer lookup.
    self.assertGreaterEqual(len(containers), 2)
    for entries in containers:
      sass = {}
      for kind, sm, payload, flags in entries:
        if kind == KIND_ELF and not flags & 0x2000:  # 0x2000: compressed payload
          self.assertEqual(payload[:4], b"\x7fELF")
          (machine,) = struct.unpack_from("<H", payload, 0x12)
          (e_flags,) = struct.unpack_from("<I", payload, 0x30)
          self.assertEqual(machine, CUDA_ELF_MACHINE)
          self.assertEqual(e_flags & 0xFF, sm, "the cubin is for another GPU than its entry says")
        if kind == KIND_ELF:
          sass[sm] = sass.get(sm, 0) + 1
      ptx = {sm for kind, sm, _, _ in entries if kind == KIND_PTX}
      self.assertEqual(set(sass), SASS)
      self.assertEqual(set(sass.values()), {1}, "a GPU has two cubins in one fat binary")
      self.assertEqual(ptx, PTX)

  def test_links_no_cuda_library_and_exports_no_runtime_api(self):
    dynamic = self.sections[".dynstr"].split(b"\0")
    needed = [n.decode() for n in dynamic if n.startswith(b"lib") and b".so" in n]
    self.assertFalse([n for n in needed if "cuda" in n or "nvidia" in n], needed)
    # The runtime API is C: exported, its plain names would sit in .dynstr.
    for name in [b"cudaLaunchKernel", b"cudaMalloc", b"__cudaRegisterFatBinary"]:
      self.assertNotIn(name, dynamic)
    # Nor CUB's template instances, which could bind to another library's copy of the same CUB.
    self.assertFalse([n for n in dynamic if b"CUB_" in n][:3])

  def test_runtime_loaded_only_where_installed(self):
    if STUB_MARKER not in self.data:
      self.skipTest("an nvcc build: the CUDA runtime is linked statically")
    with open("/proc/self/maps") as f:
      mapped = "libcudart.so.12" in f.read()
    try:
      installed = importlib.util.find_spec("nvidia.cuda_runtime") is not None
    except ModuleNotFoundError:  # no nvidia namespace package at all
      installed = False
    self.assertEqual(mapped, installed, "libcudart.so.12 installed: %s" % installed)
    # Either way the CPU kernels run.
    params = np.arange(12, dtype=np.float32).reshape(4, 3)
    out = de.embedding_lookup(tf.constant(params), tf.constant([[0, 3], [2, 2]]), combiner="sum")
    np.testing.assert_allclose(out.numpy(), [params[0] + params[3], 2 * params[2]])


if __name__ == "__main__":
  absltest.main()
