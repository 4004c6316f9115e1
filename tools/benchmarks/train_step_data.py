"""Grid, hyperparameters and data of the training-step benchmark, shared by every system timed.

One training step is a pooled (sum) embedding lookup of one table, the loss `sum(y * y)` over the
[batch, width] output `y` (so the upstream gradient is `2 * y`), the backward pass and a sparse
optimizer update of the touched rows. The TensorFlow side and the peers (PyTorch, FBGEMM:
train_step_peers.py) all build their table and batches here from the same seed, so every system
times the same ids and the same starting table with the same hyperparameters. NumPy only, so any
virtual environment can import it. Nothing to run on its own; the systems import it:

  .venv/bin/python tools/benchmarks/train_step_peers.py --system torch ...
  .venv-fbgemm/bin/python tools/benchmarks/train_step_peers.py --system fbgemm ...
"""

import numpy as np

OPTIMIZERS = ("sgd", "adagrad", "rowwise_adagrad", "lazy_adam")
WIDTHS = (16, 64, 256)
HOTNESS = ("1", "10", "powerlaw")
ROWS = 1_000_000
BATCH = 8192
# Steps cycle through this many batches, so a step's ids are not the ones the step before it read.
ROTATING_BATCHES = 4

# The update rules these stand for (g: the row's summed gradient, one step; t: the step, from 1):
#   sgd:             w -= lr * g
#   adagrad:         acc += g * g;                 w -= lr * g / sqrt(acc + epsilon)  (Keras: eps
#                    inside the sqrt); acc starts at initial_accumulator, one per element
#   rowwise_adagrad: acc_row += mean(g * g) over the row; w -= lr * g / sqrt(acc_row + epsilon);
#                    acc_row starts at initial_accumulator, one per row
#   lazy_adam:       only touched rows: m = b1 * m + (1 - b1) * g; v = b2 * v + (1 - b2) * g * g;
#                    w -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + epsilon), m, v start at 0
# A system whose rule differs (e.g. eps outside the sqrt) says so in its result's note.
HYPERPARAMS = {
  "sgd": {"learning_rate": 0.01},
  "adagrad": {"learning_rate": 0.01, "initial_accumulator": 0.1, "epsilon": 1e-7},
  "rowwise_adagrad": {"learning_rate": 0.01, "initial_accumulator": 0.1, "epsilon": 1e-7},
  "lazy_adam": {"learning_rate": 0.001, "beta1": 0.9, "beta2": 0.999, "epsilon": 1e-7},
}


def make_lengths(rng, batch, hotness):
  """Bag lengths (int64, [batch]): "1" and "10" are fixed, "powerlaw" is Zipf(1.6) + 5, capped."""
  if hotness == "1":
    return np.ones(batch, dtype=np.int64)
  if hotness == "10":
    return np.full(batch, 10, dtype=np.int64)
  if hotness == "powerlaw":
    # The same distribution as the lookup benchmark's power-law bags.
    return np.minimum(rng.zipf(1.6, size=batch) + 5, 200).astype(np.int64)
  raise ValueError(f"unknown hotness {hotness!r}; expected one of {HOTNESS}")


def make_batches(seed, rows, batch, hotness, count):
  """`count` batches from one generator: per batch its lengths, then its ids.

  Each batch is a dict of int64 arrays: "values" (ids, uniform in [0, rows)), "lengths" ([batch])
  and "offsets" ([batch], exclusive prefix sum of lengths: where each bag starts in "values").
  """
  rng = np.random.default_rng(seed)
  batches = []
  for _ in range(count):
    lengths = make_lengths(rng, batch, hotness)
    nnz = int(lengths.sum())
    values = rng.integers(0, rows, size=nnz, dtype=np.int64)
    offsets = np.zeros(batch, dtype=np.int64)
    np.cumsum(lengths[:-1], out=offsets[1:])
    batches.append({"values": values, "lengths": lengths, "offsets": offsets})
  return batches


def make_table(seed, rows, width):
  """The starting table: float32 [rows, width], uniform in [-0.05, 0.05), from its own generator.

  Drawn in float32 directly (no float64 copy of a 1M x 256 table on the way).
  """
  rng = np.random.default_rng(seed + 1)
  table = rng.random((rows, width), dtype=np.float32)
  table *= np.float32(0.1)
  table -= np.float32(0.05)
  return table


def traffic_bytes(batches, width, optimizer):
  """Estimated memory bytes one training step must move, averaged over `batches`.

  A lower bound for a step that reads and writes each thing once, in float32 (4 bytes), with
  nnz the ids in the batch, batch the bags and unique the distinct ids:
    forward:  gather the rows (nnz * width * 4) and write the pooled output (batch * width * 4);
    backward: read the upstream gradient (batch * width * 4) and write one gradient row per
              distinct id (unique * width * 4);
    update:   read and write the touched table rows (2 * unique * width * 4), plus the optimizer
              state of those rows, read and written: adagrad one element-wise tensor
              (2 * unique * width * 4), lazy_adam two (2 * 2 * unique * width * 4),
              rowwise_adagrad one float per row (2 * unique * 4), sgd none.
  Index reads, sorting and the gradient's own re-read by the update are left out. Divide by the
  step time for an effective bandwidth.
  """
  state = {
    "sgd": 0,
    "adagrad": 2 * width * 4,
    "rowwise_adagrad": 2 * 4,
    "lazy_adam": 2 * 2 * width * 4,
  }
  if optimizer not in state:
    raise ValueError(f"unknown optimizer {optimizer!r}; expected one of {OPTIMIZERS}")
  total = 0
  for b in batches:
    nnz = len(b["values"])
    bags = len(b["lengths"])
    unique = len(np.unique(b["values"]))
    forward = nnz * width * 4 + bags * width * 4
    backward = bags * width * 4 + unique * width * 4
    update = 2 * unique * width * 4 + unique * state[optimizer]
    total += forward + backward + update
  return total / len(batches)
