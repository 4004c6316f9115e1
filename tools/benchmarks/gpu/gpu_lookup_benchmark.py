"""GPU kernel benchmark: our CUDA lookup kernels against torch embedding_bag on the same buffers.

Runs on a machine with a CUDA GPU and PyTorch, no TensorFlow: our kernels are called through the
C ABI in lookup_capi.cc (built by run_gpu_benchmark.sh with nvcc) on the device pointers of torch
tensors, in the same process and on the same stream as the torch peer. Reported per case: median
ms (CUDA events, median over repeats of the mean of a block of calls) forward and forward+backward
(sparse gradient), the ratio to torch, and forward bandwidth (table rows read + output written)
against a plain device-to-device copy measured in the same run. Outputs and gradients are checked
against torch before anything is timed.

  bash tools/benchmarks/gpu/run_gpu_benchmark.sh        # builds the library, runs the full grid
"""

import argparse
import ctypes
import json
import statistics
import sys

import numpy as np
import torch


def load_library(path):
  lib = ctypes.CDLL(path)
  i64, ptr, size = ctypes.c_int64, ctypes.c_void_p, ctypes.c_size_t
  lib.de_forward_workspace_bytes.restype = size
  lib.de_backward_workspace_bytes.restype = size
  lib.de_backward_workspace_bytes.argtypes = [i64, i64]
  lib.de_forward.argtypes = [
    ptr,
    i64,
    i64,
    ptr,
    i64,
    ptr,
    i64,
    ctypes.c_int,
    ptr,
    ptr,
    size,
    ptr,
    ctypes.c_char_p,
    size,
  ]
  lib.de_backward.argtypes = [
    ptr,
    i64,
    i64,
    ptr,
    i64,
    ptr,
    i64,
    ctypes.c_int,
    ptr,
    ptr,
    ptr,
    ptr,
    size,
    ptr,
    ctypes.c_char_p,
    size,
  ]
  return lib


class Ours:
  """Our forward and backward on torch tensors, with workspaces allocated once."""

  def __init__(self, lib, table, values, row_splits, combiner):
    self.lib, self.table, self.values, self.splits = lib, table, values, row_splits
    self.combiner = 1 if combiner == "mean" else 0
    self.batch = row_splits.numel() - 1
    nnz = values.numel()
    device = table.device
    self.out = torch.empty(self.batch, table.shape[1], device=device)
    self.fwd_ws = torch.empty(lib.de_forward_workspace_bytes(), dtype=torch.uint8, device=device)
    self.bwd_ws = torch.empty(
      max(1, lib.de_backward_workspace_bytes(nnz, self.batch)), dtype=torch.uint8, device=device
    )
    capacity = min(nnz, table.shape[0])
    self.unique_ids = torch.empty(max(capacity, 1), dtype=torch.int64, device=device)
    self.unique_grad = torch.empty(max(capacity, 1), table.shape[1], device=device)
    self.num_unique = ctypes.c_int64(0)
    self.error = ctypes.create_string_buffer(512)

  def _check(self, code):
    if code != 0:
      raise RuntimeError(self.error.value.decode())

  def forward(self):
    stream = torch.cuda.current_stream().cuda_stream
    self._check(
      self.lib.de_forward(
        self.table.data_ptr(),
        self.table.shape[0],
        self.table.shape[1],
        self.values.data_ptr(),
        self.values.numel(),
        self.splits.data_ptr(),
        self.batch,
        self.combiner,
        self.out.data_ptr(),
        self.fwd_ws.data_ptr(),
        self.fwd_ws.numel(),
        stream,
        self.error,
        len(self.error),
      )
    )
    return self.out

  def backward(self, grad_output):
    stream = torch.cuda.current_stream().cuda_stream
    self._check(
      self.lib.de_backward(
        grad_output.data_ptr(),
        self.table.shape[0],
        self.table.shape[1],
        self.values.data_ptr(),
        self.values.numel(),
        self.splits.data_ptr(),
        self.batch,
        self.combiner,
        self.unique_ids.data_ptr(),
        self.unique_grad.data_ptr(),
        ctypes.byref(self.num_unique),
        self.bwd_ws.data_ptr(),
        self.bwd_ws.numel(),
        stream,
        self.error,
        len(self.error),
      )
    )
    n = self.num_unique.value
    return self.unique_ids[:n], self.unique_grad[:n]


def median_ms(fn, iters, repeats):
  fn()
  torch.cuda.synchronize()
  samples = []
  for _ in range(repeats):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
      fn()
    end.record()
    end.synchronize()
    samples.append(start.elapsed_time(end) / iters)
  return statistics.median(samples)


def copy_bandwidth(iters, repeats, nbytes=1 << 30):
  """GB/s of a device-to-device copy: bytes read plus bytes written per second."""
  src = torch.empty(nbytes // 4, device="cuda")
  dst = torch.empty_like(src)
  ms = median_ms(lambda: dst.copy_(src), iters, repeats)
  return 2 * nbytes / ms / 1e6


def lengths_for(rng, batch, hotness):
  if hotness == "powerlaw":
    return np.minimum(rng.zipf(1.6, size=batch) + 5, 200)
  return np.full(batch, int(hotness))


def run_case(lib, table, batch, hotness, combiner, args, copy_gb_s):
  rng = np.random.default_rng(1)
  lengths = lengths_for(rng, batch, hotness)
  values = torch.from_numpy(rng.integers(0, table.shape[0], size=int(lengths.sum()))).cuda()
  splits = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)])).cuda()
  offsets = splits[:-1].contiguous()
  ours = Ours(lib, table, values, splits, combiner)
  weight = torch.nn.Parameter(table)

  def torch_forward():
    return torch.nn.functional.embedding_bag(values, weight, offsets, mode=combiner, sparse=True)

  grad_output = torch.randn(batch, table.shape[1], device="cuda")

  def torch_fwd_bwd():
    weight.grad = None
    torch_forward().backward(grad_output)

  def ours_fwd_bwd():
    ours.forward()
    ours.backward(grad_output)

  # Correctness first: outputs, and the sparse gradient coalesced on both sides.
  expected = torch_forward().detach()
  torch.testing.assert_close(ours.forward(), expected, rtol=1e-4, atol=1e-4)
  torch_fwd_bwd()
  ref = weight.grad.coalesce()
  ids, grad = ours.backward(grad_output)
  order = torch.argsort(ids)
  torch.testing.assert_close(ids[order], ref.indices()[0])
  torch.testing.assert_close(grad[order], ref.values(), rtol=1e-4, atol=1e-4)

  ours_fwd = median_ms(ours.forward, args.iters, args.repeats)
  peer_fwd = median_ms(torch_forward, args.iters, args.repeats)
  ours_both = median_ms(ours_fwd_bwd, args.iters, args.repeats)
  peer_both = median_ms(torch_fwd_bwd, args.iters, args.repeats)
  moved = (values.numel() + batch) * table.shape[1] * 4  # rows read + output written
  gb_s = moved / ours_fwd / 1e6
  return {
    "width": table.shape[1],
    "hotness": str(hotness),
    "combiner": combiner,
    "ours_fwd_ms": ours_fwd,
    "torch_fwd_ms": peer_fwd,
    "fwd_speedup": peer_fwd / ours_fwd,
    "ours_fwd_bwd_ms": ours_both,
    "torch_fwd_bwd_ms": peer_both,
    "fwd_bwd_speedup": peer_both / ours_both,
    "fwd_gb_s": gb_s,
    "fwd_fraction_of_copy": gb_s / copy_gb_s,
  }


def main(argv):
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--lib", required=True, help="path of the built lookup_capi library")
  parser.add_argument("--vocab", type=int, default=1_000_000)
  parser.add_argument("--widths", default="16,64,256")
  parser.add_argument("--batch", type=int, default=8192)
  parser.add_argument("--hotness", default="1,10,powerlaw")
  parser.add_argument("--combiners", default="sum,mean")
  parser.add_argument("--iters", type=int, default=50)
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--json", help="also write the rows here")
  args = parser.parse_args(argv)
  if not torch.cuda.is_available():
    print("no CUDA device: nothing to measure", file=sys.stderr)
    return 2
  lib = load_library(args.lib)
  copy_gb_s = copy_bandwidth(args.iters, args.repeats)
  print(
    f"{torch.cuda.get_device_name()}; torch {torch.__version__}; device copy "
    f"{copy_gb_s:.0f} GB/s (read + write); V={args.vocab} batch={args.batch}; median of "
    f"{args.repeats} x {args.iters}\n"
  )
  print(
    "| width | hotness | combiner | ours fwd ms | torch fwd ms | torch/ours | ours fwd+bwd ms "
    "| torch fwd+bwd ms | torch/ours | fwd GB/s | of copy BW |"
  )
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  rows = []
  for width in map(int, args.widths.split(",")):
    table = torch.randn(args.vocab, width, device="cuda")
    for hotness in args.hotness.split(","):
      for combiner in args.combiners.split(","):
        r = run_case(lib, table, args.batch, hotness, combiner, args, copy_gb_s)
        rows.append(r)
        print(
          f"| {width} | {hotness} | {combiner} | {r['ours_fwd_ms']:.3f} | "
          f"{r['torch_fwd_ms']:.3f} | {r['fwd_speedup']:.2f} | {r['ours_fwd_bwd_ms']:.3f} | "
          f"{r['torch_fwd_bwd_ms']:.3f} | {r['fwd_bwd_speedup']:.2f} | {r['fwd_gb_s']:.0f} | "
          f"{r['fwd_fraction_of_copy']:.0%} |",
          flush=True,
        )
    del table
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump({"copy_gb_s": copy_gb_s, "rows": rows}, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
