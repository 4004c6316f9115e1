"""The peers of the training-step benchmark: one step of PyTorch's or FBGEMM's embedding bag.

A step is the pooled (sum) lookup y = bag sums of the table's rows, the backward pass of the loss
sum(y * y) (handed to the lookup as its contiguous upstream gradient 2 * y) and the sparse
optimizer update of the touched rows; steps cycle through train_step_data.ROTATING_BATCHES
batches. Table, batches and hyperparameters come from train_step_data.py with the given seed, so
the TensorFlow side times the same work. The systems:
  torch:  torch.nn.EmbeddingBag(mode="sum", sparse=True) with torch.optim.SGD / Adagrad /
          SparseAdam (no row-wise Adagrad in torch.optim);
  fbgemm: FBGEMM's SplitTableBatchedEmbeddingBagsCodegen on the CPU (one HOST table), whose
          backward applies the optimizer itself (EXACT_SGD / EXACT_ADAGRAD /
          EXACT_ROWWISE_ADAGRAD; no Adam on the CPU).
Each repeat is the mean of --steps timed steps after 2 warm-up steps; results go to --out as JSON.
--check runs a tiny case per optimizer and prints each system's updated rows next to a NumPy
reference of the rule it is meant to apply (mismatches are reported, not asserted).

  .venv/bin/python tools/benchmarks/train_step_peers.py --system torch \
      --configs '[{"optimizer": "adagrad", "width": 64, "hotness": "10"}]' --out torch.json
  PY=$(tools/benchmarks/peer_venv.sh)
  $PY tools/benchmarks/train_step_peers.py --system fbgemm --configs '[...]' --out fbgemm.json
  $PY tools/benchmarks/train_step_peers.py --system fbgemm --check
  # smoke test
  .venv/bin/python tools/benchmarks/train_step_peers.py --system torch --rows 100000 --steps 3 \
      --repeats 1 --configs '[{"optimizer": "sgd", "width": 16, "hotness": "1"}]' --out /tmp/t.json
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_step_data as data  # noqa: E402

WARMUP_STEPS = 5
WARMUP_SECONDS = 1.5
# torch.optim.Adagrad builds sparse tensors without invariant checks and says so once; expected.
warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")


class Unsupported(Exception):
  """The system has no such optimizer; the message says why."""


class TorchPeer:
  """nn.EmbeddingBag with a sparse gradient and a torch.optim optimizer."""

  def __init__(self, table, optimizer, hp):
    rows, width = table.shape
    if optimizer == "rowwise_adagrad":
      raise Unsupported("torch.optim has no row-wise Adagrad")
    self.emb = torch.nn.EmbeddingBag(
      rows, width, mode="sum", sparse=True, _weight=torch.from_numpy(table)
    )
    params = self.emb.parameters()
    lr = hp["learning_rate"]
    if optimizer == "sgd":
      self.opt = torch.optim.SGD(params, lr=lr)
      self.note = "torch.optim.SGD on the uncoalesced sparse gradient"
    elif optimizer == "adagrad":
      self.opt = torch.optim.Adagrad(
        params, lr=lr, initial_accumulator_value=hp["initial_accumulator"], eps=hp["epsilon"]
      )
      self.note = "torch.optim.Adagrad puts eps outside the sqrt: w -= lr*g/(sqrt(acc)+eps)"
    elif optimizer == "lazy_adam":
      self.opt = torch.optim.SparseAdam(
        params, lr=lr, betas=(hp["beta1"], hp["beta2"]), eps=hp["epsilon"]
      )
      self.note = "torch.optim.SparseAdam: updates only the rows in the gradient"
    else:
      raise ValueError(f"unknown optimizer {optimizer!r}")

  @staticmethod
  def inputs(batch):
    # EmbeddingBag takes the bags' start offsets, [batch].
    return torch.from_numpy(batch["values"]), torch.from_numpy(batch["offsets"])

  def step(self, values, offsets):
    y = self.emb(values, offsets)
    # d sum(y*y) / dy, contiguous (a `.sum().backward()` gradient has stride 0: a slow path).
    y.backward(2.0 * y.detach())
    self.opt.step()
    self.opt.zero_grad(set_to_none=True)

  def weights(self):
    return self.emb.weight.detach().numpy().copy()


class FbgemmPeer:
  """FBGEMM's table-batched embedding bag on the CPU, the optimizer fused into its backward."""

  def __init__(self, table, optimizer, hp):
    from fbgemm_gpu.split_embedding_configs import EmbOptimType, SparseType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import (
      ComputeDevice,
      EmbeddingLocation,
      PoolingMode,
    )
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
      SplitTableBatchedEmbeddingBagsCodegen,
    )

    rows, width = table.shape
    kinds = {
      "sgd": EmbOptimType.EXACT_SGD,
      "adagrad": EmbOptimType.EXACT_ADAGRAD,
      "rowwise_adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD,
      "lazy_adam": EmbOptimType.ADAM,
    }
    if optimizer not in kinds:
      raise ValueError(f"unknown optimizer {optimizer!r}")
    kwargs = {"learning_rate": hp["learning_rate"]}
    if "epsilon" in hp:
      kwargs["eps"] = hp["epsilon"]
    if "beta1" in hp:
      kwargs["beta1"], kwargs["beta2"] = hp["beta1"], hp["beta2"]
    try:
      self.tbe = SplitTableBatchedEmbeddingBagsCodegen(
        [(rows, width, EmbeddingLocation.HOST, ComputeDevice.CPU)],
        optimizer=kinds[optimizer],
        pooling_mode=PoolingMode.SUM,
        weights_precision=SparseType.FP32,
        output_dtype=SparseType.FP32,
        **kwargs,
      )
    except (AssertionError, NotImplementedError, RuntimeError) as e:
      raise Unsupported(f"{kinds[optimizer]} on ComputeDevice.CPU: {e}") from None
    self.tbe.split_embedding_weights()[0].copy_(torch.from_numpy(table))
    if "initial_accumulator" in hp:
      # FBGEMM starts its accumulators at 0: set them to the shared initial value.
      self.tbe.split_optimizer_states()[0][0].fill_(hp["initial_accumulator"])
    self.note = {
      "sgd": "EXACT_SGD",
      "adagrad": "EXACT_ADAGRAD, eps outside the sqrt: w -= lr*g/(sqrt(acc)+eps)",
      "rowwise_adagrad": (
        "EXACT_ROWWISE_ADAGRAD: acc += mean(g*g) over the row; eps outside the sqrt"
      ),
    }.get(optimizer, "")

  @staticmethod
  def inputs(batch):
    # TBE takes B*T+1 offsets: the bags' starts and the end of the last bag.
    values = batch["values"]
    offsets = np.append(batch["offsets"], np.int64(len(values)))
    return torch.from_numpy(values), torch.from_numpy(offsets)

  def step(self, values, offsets):
    y = self.tbe(values, offsets)
    # The backward pass updates the table in place; there is no optimizer.step().
    y.backward(2.0 * y.detach())

  def weights(self):
    return self.tbe.split_embedding_weights()[0].numpy().copy()


PEERS = {"torch": TorchPeer, "fbgemm": FbgemmPeer}


def versions(system):
  found = {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__}
  if system == "fbgemm":
    import fbgemm_gpu

    found["fbgemm_gpu"] = getattr(fbgemm_gpu, "__version__", "unknown")
  return found


def time_config(peer, inputs, steps, repeats):
  """Per repeat: warm-up steps (at least WARMUP_STEPS and WARMUP_SECONDS: a fresh table's pages
  are still being faulted in or collapsed into huge pages at first), then the mean ms of `steps`
  timed steps."""
  samples = []
  counter = 0
  for _ in range(repeats):
    start = time.perf_counter()
    warm = 0
    while warm < WARMUP_STEPS or time.perf_counter() - start < WARMUP_SECONDS:
      peer.step(*inputs[counter % len(inputs)])
      counter += 1
      warm += 1
    start = time.perf_counter()
    for _ in range(steps):
      peer.step(*inputs[counter % len(inputs)])
      counter += 1
    samples.append((time.perf_counter() - start) * 1e3 / steps)
  return samples


def run_config(system, config, args):
  optimizer, width, hotness = config["optimizer"], int(config["width"]), str(config["hotness"])
  result = {"optimizer": optimizer, "width": width, "hotness": hotness}
  batches = data.make_batches(args.seed, args.rows, args.batch, hotness, data.ROTATING_BATCHES)
  result["traffic_bytes"] = data.traffic_bytes(batches, width, optimizer)
  table = data.make_table(args.seed, args.rows, width)
  try:
    peer = PEERS[system](table, optimizer, data.HYPERPARAMS[optimizer])
  except Unsupported as e:
    result.update(samples_ms=[], median_ms=None, supported=False, note=str(e))
    return result
  del table  # The peer holds its own copy (or shares it), no second table for the run.
  inputs = [peer.inputs(b) for b in batches]
  samples = time_config(peer, inputs, args.steps, args.repeats)
  result.update(
    samples_ms=samples, median_ms=statistics.median(samples), supported=True, note=peer.note
  )
  del peer
  return result


def reference(table, batches, optimizer, hp, steps, eps_in_sqrt):
  """The update rule of train_step_data.HYPERPARAMS in float64; eps_in_sqrt=False moves eps
  of the Adagrad rules out of the sqrt (torch's and FBGEMM's way)."""
  w = table.astype(np.float64)
  rows, width = w.shape
  lr, eps = hp["learning_rate"], hp.get("epsilon", 0.0)
  acc = np.full((rows, width), hp.get("initial_accumulator", 0.0))
  acc_row = np.full(rows, hp.get("initial_accumulator", 0.0))
  m, v = np.zeros_like(w), np.zeros_like(w)

  def adagrad_denom(a):
    return np.sqrt(a + eps) if eps_in_sqrt else np.sqrt(a) + eps

  for t in range(1, steps + 1):
    b = batches[(t - 1) % len(batches)]
    bag = np.repeat(np.arange(len(b["lengths"])), b["lengths"])
    y = np.zeros((len(b["lengths"]), width))
    np.add.at(y, bag, w[b["values"]])
    g = np.zeros_like(w)
    np.add.at(g, b["values"], (2.0 * y)[bag])
    rows_hit = np.unique(b["values"])
    gt = g[rows_hit]
    if optimizer == "sgd":
      w[rows_hit] -= lr * gt
    elif optimizer == "adagrad":
      acc[rows_hit] += gt * gt
      w[rows_hit] -= lr * gt / adagrad_denom(acc[rows_hit])
    elif optimizer == "rowwise_adagrad":
      acc_row[rows_hit] += np.mean(gt * gt, axis=1)
      w[rows_hit] -= lr * gt / adagrad_denom(acc_row[rows_hit])[:, None]
    elif optimizer == "lazy_adam":
      b1, b2 = hp["beta1"], hp["beta2"]
      m[rows_hit] = b1 * m[rows_hit] + (1 - b1) * gt
      v[rows_hit] = b2 * v[rows_hit] + (1 - b2) * gt * gt
      alpha = lr * np.sqrt(1 - b2**t) / (1 - b1**t)
      w[rows_hit] -= alpha * m[rows_hit] / (np.sqrt(v[rows_hit]) + eps)
  return w


def run_check(system, seed):
  """Tiny cases: each optimizer's table after 2 steps, next to the NumPy rule it should follow.

  Run with the benchmark's epsilon and with epsilon 0.1, where the two Adagrad placements of eps
  (inside or outside the sqrt) differ enough to tell which one the system applies.
  """
  rows, width, batch, steps, tol = 50, 4, 8, 2, 1e-5
  torch.set_printoptions(precision=6)
  mismatches = 0
  for hotness in ("10", "powerlaw"):
    batches = data.make_batches(seed, rows, batch, hotness, data.ROTATING_BATCHES)
    table = data.make_table(seed, rows, width)
    for optimizer in data.OPTIMIZERS:
      for eps_case in ("benchmark", "0.1"):
        hp = dict(data.HYPERPARAMS[optimizer])
        if "epsilon" not in hp and eps_case != "benchmark":
          continue
        if eps_case != "benchmark":
          hp["epsilon"] = float(eps_case)
        label = f"{system} {optimizer:15s} hotness={hotness:8s} eps={hp.get('epsilon', '-')}"
        try:
          peer = PEERS[system](table.copy(), optimizer, hp)
        except Unsupported as e:
          print(f"{label}: unsupported ({e})")
          break
        inputs = [peer.inputs(b) for b in batches]
        for i in range(steps):
          peer.step(*inputs[i % len(inputs)])
        got = peer.weights()
        rules = {"shared rule": True}
        if optimizer in ("adagrad", "rowwise_adagrad"):
          rules["eps outside sqrt"] = False
        diffs = {
          name: float(np.max(np.abs(got - reference(table, batches, optimizer, hp, steps, inside))))
          for name, inside in rules.items()
        }
        matched = [name for name, d in diffs.items() if d <= tol]
        shown = ", ".join(f"max|diff| vs {name} {d:.2e}" for name, d in diffs.items())
        verdict = f"matches {' and '.join(matched)}" if matched else "MISMATCH"
        mismatches += not matched
        print(f"{label}: {shown} -> {verdict}")
        if hotness == "10" and eps_case == "benchmark":
          ref = reference(table, batches, optimizer, hp, steps, True)
          touched = np.unique(np.concatenate([batches[i]["values"] for i in range(steps)]))
          for r in touched[:3]:
            print(f"    row {r:2d}  {system}: {np.array2string(got[r], precision=6)}")
            print(f"            numpy: {np.array2string(ref[r].astype(np.float32), precision=6)}")
  print(f"check: {mismatches} mismatch(es) (tolerance {tol})")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--system", choices=sorted(PEERS), required=True)
  parser.add_argument("--configs", help='JSON list of {"optimizer", "width", "hotness"}')
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--steps", type=int, default=20, help="timed steps per repeat")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--rows", type=int, default=data.ROWS)
  parser.add_argument("--batch", type=int, default=data.BATCH)
  parser.add_argument(
    "--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads"
  )
  parser.add_argument("--out", help="JSON file to write (default: stdout)")
  parser.add_argument("--check", action="store_true", help="tiny correctness check, then exit")
  args = parser.parse_args()

  torch.set_num_threads(args.threads)
  if args.check:
    run_check(args.system, args.seed)
    return
  if not args.configs:
    parser.error("--configs is required (unless --check)")
  configs = json.loads(args.configs)
  results = []
  for config in configs:
    results.append(run_config(args.system, config, args))
    r = results[-1]
    shown = f"{r['median_ms']:.3f} ms" if r["supported"] else f"unsupported: {r['note']}"
    print(f"{args.system} {r['optimizer']} width={r['width']} hotness={r['hotness']}: {shown}")
  report = {
    "system": args.system,
    "versions": versions(args.system),
    "threads": torch.get_num_threads(),
    "setup": {
      "rows": args.rows,
      "batch": args.batch,
      "seed": args.seed,
      "steps": args.steps,
      "repeats": args.repeats,
      "warmup_steps": WARMUP_STEPS,
      "warmup_seconds": WARMUP_SECONDS,
      "rotating_batches": data.ROTATING_BATCHES,
    },
    "results": results,
  }
  text = json.dumps(report, indent=2)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text + "\n")
  else:
    print(text)


if __name__ == "__main__":
  main()
