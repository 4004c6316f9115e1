"""Fuzzes every op our library registers, called directly (tf.raw_ops style), for crashes.

Hypothesis draws arbitrary ranks, extreme dimensions (0, 1, 2**31, 2**62, INT64_MAX; a tensor
that cannot exist gets a zero dimension), extreme and negative values, mismatched dtypes and
attrs. Each case runs in a separate worker process, eagerly and inside a `tf.function` (which
also runs the op's shape function on constant inputs), so a case that aborts or crashes the
process is caught and reported with its inputs. Every case must return or raise a
`tf.errors.OpError` other than InternalError (or the op wrapper's TypeError/ValueError for a
bad attr): never kill the process.

DE_FUZZ_EXAMPLES sets the number of cases (default 1500, about 20 s here).
"""

import json
import os
import subprocess
import sys

from absl.testing import absltest
import hypothesis
from hypothesis import strategies as st

INT64_MAX = 2**63 - 1
EXTREME_DIMS = [0, 1, 2, 3, 2**31 - 1, 2**31, 2**32 + 5, 2**62, INT64_MAX]
EXTREME_VALUES = [
  0,
  1,
  -1,
  2,
  3,
  7,
  2**31 - 1,
  2**31,
  -(2**31),
  2**32 + 5,
  2**62,
  INT64_MAX,
  -INT64_MAX - 1,
]
MAX_ELEMENTS = 64
OPS = [
  "DePooledEmbeddingLookup",
  "DeResourcePooledEmbeddingLookup",
  "DePooledEmbeddingLookupGrad",
  "DeWeightedPooledEmbeddingLookup",
  "DeResourceWeightedPooledEmbeddingLookup",
  "DeWeightedPooledEmbeddingLookupGrad",
  "DeSparseRowSplits",
  "DeReadVariableNoCopy",
  "DeIntegerLookup",
  "DeInitialIntegerLookupState",
  "DeValidateIntegerLookupState",
  "DeSparseApplySgd",
  "DeSparseApplyAdagrad",
  "DeSparseApplyRowwiseAdagrad",
  "DeSparseApplyLazyAdam",
  "DeSparseApplyLookupGrad",
]
# Variables and scalar inputs of each sparse update op.
SPARSE_APPLY = {
  "DeSparseApplySgd": (1, 1),
  "DeSparseApplyAdagrad": (2, 2),
  "DeSparseApplyRowwiseAdagrad": (2, 2),
  "DeSparseApplyLazyAdam": (3, 4),
}
# The fused op's rules: the update op whose variables and scalars each takes.
LOOKUP_GRAD_RULES = {
  "sgd": "DeSparseApplySgd",
  "adagrad": "DeSparseApplyAdagrad",
  "rowwise_adagrad": "DeSparseApplyRowwiseAdagrad",
  "lazy_adam": "DeSparseApplyLazyAdam",
}
INT_DTYPES = ["int32", "int64"]
ALL_DTYPES = ["float32", "float64", "int32", "int64", "float16"]
# Every table dtype the lookup kernels read.
FLOAT_DTYPES = ["float16", "bfloat16", "float32", "float64"]


@st.composite
def tensors(draw, dtypes=ALL_DTYPES, max_rank=3):
  """A tensor spec: dtype, shape and values; shapes whose product is too big get a zero dim."""
  dtype = draw(st.sampled_from(dtypes))
  rank = draw(st.integers(0, max_rank))
  shape = [draw(st.sampled_from(EXTREME_DIMS) | st.integers(0, 6)) for _ in range(rank)]
  size = 1
  for dim in shape:
    size *= dim
  if size > MAX_ELEMENTS:
    shape[draw(st.integers(0, rank - 1))] = 0
    size = 0
  # TensorFlow multiplies the dims in order and rejects a running product past INT64_MAX even
  # when a later dim is 0: such a shape cannot exist, so put the zero first.
  running = 1
  for dim in shape:
    running *= dim
    if running > INT64_MAX:
      shape[0] = 0
      break
  if dtype.startswith("int"):
    bound = 2**31 - 1 if dtype == "int32" else INT64_MAX
    element = st.sampled_from(
      [v for v in EXTREME_VALUES if -bound - 1 <= v <= bound]
    ) | st.integers(-3, 12)
  else:
    element = st.sampled_from([0.0, 1.0, -1.5, 1e30]) | st.floats(-4, 4)
  values = draw(st.lists(element, min_size=size, max_size=size))
  return {"dtype": dtype, "shape": shape, "values": values}


@st.composite
def csr_like(draw):
  """row_splits that are often valid for the ids, so cases reach past the first checks."""
  nnz = draw(st.integers(0, 6))
  batch = draw(st.integers(0, 4))
  cuts = sorted(
    draw(st.lists(st.integers(0, nnz), min_size=max(batch - 1, 0), max_size=max(batch - 1, 0)))
  )
  splits = [0] + cuts + [nnz] if batch > 0 else [0]
  return nnz, splits


def table_and_state(draw, dtype, rows, width, num_vars, per_row):
  """A sparse update's variables: the table, then its state, sometimes of a wrong shape."""
  table = {"dtype": dtype, "shape": [rows, width], "values": [0.5] * (rows * width)}
  slot_shape = [rows, 1] if per_row else [rows, width]
  if draw(st.integers(0, 3)) == 0:
    slot_shape = [draw(st.integers(0, 6)), draw(st.integers(0, 4))]
  slot = {"dtype": dtype, "shape": slot_shape, "values": [0.1] * (slot_shape[0] * slot_shape[1])}
  return [table] + [slot] * (num_vars - 1)


@st.composite
def cases(draw):
  op = draw(st.sampled_from(OPS))
  case = {"op": op, "graph": draw(st.booleans()), "attrs": {}}
  lookup_attrs = {
    "combiner": draw(st.sampled_from(["sum", "mean", "sqrtn"])),
    "bounds_check": draw(st.sampled_from(["error", "skip"])),
  }
  structured = draw(st.booleans())
  weighted = "Weighted" in op
  if op in (
    "DePooledEmbeddingLookup",
    "DeResourcePooledEmbeddingLookup",
    "DePooledEmbeddingLookupGrad",
    "DeWeightedPooledEmbeddingLookup",
    "DeResourceWeightedPooledEmbeddingLookup",
    "DeWeightedPooledEmbeddingLookupGrad",
  ):
    case["attrs"] = lookup_attrs
    if structured:
      nnz, splits = draw(csr_like())
      id_dtype = draw(st.sampled_from(INT_DTYPES))
      ids = {
        "dtype": id_dtype,
        "shape": [nnz],
        "values": draw(
          st.lists(
            st.sampled_from(EXTREME_VALUES[:9]) | st.integers(-2, 8), min_size=nnz, max_size=nnz
          )
        ),
      }
      if id_dtype == "int32":
        ids["values"] = [max(min(v, 2**31 - 1), -(2**31)) for v in ids["values"]]
      splits = {
        "dtype": draw(st.sampled_from(INT_DTYPES)),
        "shape": [len(splits)],
        "values": splits,
      }
    else:
      ids = draw(tensors(INT_DTYPES + ["float32"]))
      splits = draw(tensors(INT_DTYPES + ["float32"]))
    case["ids"], case["row_splits"] = ids, splits
    if weighted:
      # One weight per id (NaN and infinities included) or any tensor at all.
      if structured and draw(st.booleans()):
        case["weights"] = {
          "dtype": draw(st.sampled_from(FLOAT_DTYPES)),
          "shape": [len(ids["values"])],
          "values": draw(
            st.lists(
              st.sampled_from([0.0, -1.0, 1e30, float("nan"), float("inf")]) | st.floats(-2, 2),
              min_size=len(ids["values"]),
              max_size=len(ids["values"]),
            )
          ),
        }
      else:
        case["weights"] = draw(tensors(FLOAT_DTYPES + ["int32"]))
    if op in ("DePooledEmbeddingLookupGrad", "DeWeightedPooledEmbeddingLookupGrad"):
      case["grad"] = draw(tensors(FLOAT_DTYPES + ["int32"]))
      case["num_rows"] = draw(st.sampled_from(EXTREME_VALUES) | st.integers(-2, 9))
      case["attrs"]["T"] = draw(st.sampled_from(FLOAT_DTYPES))  # the table's
    elif op in ("DePooledEmbeddingLookup", "DeWeightedPooledEmbeddingLookup"):
      case["params"] = draw(tensors(FLOAT_DTYPES + ["int32"]))
    else:
      case["variable"] = draw(st.none() | tensors(FLOAT_DTYPES + ["int64"]))
      case["attrs"]["dtype"] = draw(st.sampled_from(FLOAT_DTYPES))
      if not weighted:  # a weighted op's output dtype is its weights'
        case["attrs"]["Tout"] = draw(st.sampled_from(FLOAT_DTYPES))
  elif op == "DeSparseRowSplits":
    case["indices"] = draw(tensors(["int64", "int32"]))
    case["dense_shape"] = draw(tensors(["int64", "int32"], max_rank=1))
    case["attrs"] = {"out_type": draw(st.sampled_from(INT_DTYPES))}
  elif op == "DeReadVariableNoCopy":
    case["variable"] = draw(st.none() | tensors())
    case["attrs"] = {"dtype": draw(st.sampled_from(ALL_DTYPES))}
  elif op == "DeInitialIntegerLookupState":
    case["attrs"] = {
      "max_tokens": draw(st.sampled_from([1, 2, 5, 2**16, 2**40 + 1, 2**62, INT64_MAX]))
    }
  elif op == "DeValidateIntegerLookupState":
    max_tokens = draw(st.sampled_from([1, 2, 5, 7, 2**40 + 1, INT64_MAX]))
    if draw(st.booleans()) and max_tokens < 8:  # a real layout, often damaged
      slots = 16
      values = [draw(st.integers(-1, max_tokens + 1))]
      for _ in range(slots):
        values += [
          draw(st.sampled_from([-(2**63), -1, 0, 3, 2**62])),
          draw(st.integers(-2, max_tokens + 1)),
        ]
      case["state"] = {"dtype": "int64", "shape": [len(values)], "values": values}
    else:
      case["state"] = draw(tensors(["int64", "int32"], max_rank=2))
    case["attrs"] = {"max_tokens": max_tokens}
  elif op == "DeSparseApplyLookupGrad":
    rule = draw(st.sampled_from(sorted(LOOKUP_GRAD_RULES)))
    num_vars, num_scalars = SPARSE_APPLY[LOOKUP_GRAD_RULES[rule]]
    if draw(st.integers(0, 5)) == 0:  # a count the rule does not take
      num_vars, num_scalars = draw(st.integers(1, 4)), draw(st.integers(1, 5))
    dtype = draw(st.sampled_from(["float32", "float64"]))
    case["dtype"] = dtype
    case["attrs"] = dict(lookup_attrs, rule=rule)
    if structured:  # a real table, state and CSR ids, so cases reach the kernel
      rows, width = draw(st.integers(0, 5)), draw(st.integers(0, 4))
      nnz, splits = draw(csr_like())
      batch = len(splits) - 1
      case["variables"] = table_and_state(
        draw, dtype, rows, width, num_vars, rule == "rowwise_adagrad"
      )
      element = st.sampled_from(EXTREME_VALUES[:9]) | st.integers(-2, 6)
      if draw(st.booleans()):
        element = st.integers(0, max(rows - 1, 0))
      id_dtype = draw(st.sampled_from(INT_DTYPES))
      values = draw(st.lists(element, min_size=nnz, max_size=nnz))
      if id_dtype == "int32":
        values = [max(min(v, 2**31 - 1), -(2**31)) for v in values]
      case["ids"] = {"dtype": id_dtype, "shape": [nnz], "values": values}
      case["row_splits"] = {
        "dtype": draw(st.sampled_from(INT_DTYPES)),
        "shape": [len(splits)],
        "values": splits,
      }
      grad_width = width if draw(st.integers(0, 3)) else draw(st.integers(0, 5))
      case["grad"] = {
        "dtype": dtype,
        "shape": [batch, grad_width],
        "values": draw(
          st.lists(
            st.sampled_from([1.0, -2.0, 1e30, float("nan")]) | st.floats(-2, 2),
            min_size=batch * grad_width,
            max_size=batch * grad_width,
          )
        ),
      }
      case["num_rows"] = rows if draw(st.integers(0, 3)) else draw(st.sampled_from(EXTREME_VALUES))
      if draw(st.booleans()):
        n = nnz if draw(st.integers(0, 3)) else draw(st.integers(0, 7))
        case["weights"] = {"dtype": dtype, "shape": [n], "values": [0.5] * n}
    else:
      case["variables"] = [
        draw(st.none() | tensors(["float32", "float64", "int64"])) for _ in range(num_vars)
      ]
      case["ids"] = draw(tensors(INT_DTYPES + ["float32"]))
      case["row_splits"] = draw(tensors(INT_DTYPES + ["float32"]))
      case["grad"] = draw(tensors(["float32", "float64"]))
      case["num_rows"] = draw(st.sampled_from(EXTREME_VALUES) | st.integers(-2, 9))
      if draw(st.booleans()):
        case["weights"] = draw(tensors(["float32", "float64"]))
    case["alias"] = num_vars > 1 and draw(st.integers(0, 3)) == 0
    valid_scalar = {"dtype": dtype, "shape": [], "values": [0.1]}
    for k in range(num_scalars):
      case[f"scalar{k}"] = (
        valid_scalar if structured else draw(st.just(valid_scalar) | tensors([dtype], max_rank=1))
      )
  elif op in SPARSE_APPLY:
    num_vars, num_scalars = SPARSE_APPLY[op]
    dtype = draw(st.sampled_from(["float32", "float64"]))
    case["dtype"] = dtype
    if structured:  # well-formed shapes, extreme indices, sometimes a wrong slot shape
      rows, width, n = draw(st.integers(0, 5)), draw(st.integers(0, 4)), draw(st.integers(0, 6))
      per_row = op == "DeSparseApplyRowwiseAdagrad"
      case["variables"] = table_and_state(draw, dtype, rows, width, num_vars, per_row)
      element = st.sampled_from(EXTREME_VALUES) | st.integers(-2, 6)
      if draw(st.booleans()):  # every index in range: the update itself runs
        element = st.integers(0, max(rows - 1, 0))
      values = draw(st.lists(element, min_size=n, max_size=n))
      index_dtype = draw(st.sampled_from(INT_DTYPES))
      if index_dtype == "int32":
        values = [max(min(v, 2**31 - 1), -(2**31)) for v in values]
      case["indices"] = {"dtype": index_dtype, "shape": [n], "values": values}
      case["grad"] = {"dtype": dtype, "shape": [n, width], "values": [1.0] * (n * width)}
    else:
      case["variables"] = [
        draw(st.none() | tensors(["float32", "float64", "int64"])) for _ in range(num_vars)
      ]
      case["indices"] = draw(tensors(INT_DTYPES + ["float32"]))
      case["grad"] = draw(tensors(["float32", "float64"]))
    case["alias"] = num_vars > 1 and draw(st.integers(0, 3)) == 0
    valid_scalar = {"dtype": dtype, "shape": [], "values": [0.1]}
    for k in range(num_scalars):
      case[f"scalar{k}"] = (
        valid_scalar if structured else draw(st.just(valid_scalar) | tensors([dtype], max_rank=1))
      )
  else:
    case["variable"] = draw(st.none() | tensors(["int64", "int32", "float32"], max_rank=2))
    case["keys"] = draw(tensors(INT_DTYPES + ["float32"]))
    case["attrs"] = {
      "max_tokens": draw(st.sampled_from([1, 2, 3, 5, 2**31, 2**62, INT64_MAX])),
      "insert": draw(st.booleans()),
    }
  return case


# The worker: reads one JSON case per line, runs it, answers one line. Runs in its own process.
WORKER = r'''
import json, sys
import numpy as np
import tensorflow as tf
from distributed_embeddings.python.ops import embedding_lookup_ops
ops = embedding_lookup_ops._ops

def tensor(spec):
  # tf.zeros builds empty tensors of any legal shape ([0, 2**62]); NumPy may refuse them.
  if not spec["values"]:
    return tf.zeros(spec["shape"], spec["dtype"])
  return tf.reshape(tf.constant(spec["values"], spec["dtype"]), spec["shape"])

def variable(spec, dtype):
  if spec is None:  # a handle to a variable that was never assigned
    return tf.raw_ops.VarHandleOp(dtype=tf.as_dtype(dtype), shape=[], shared_name="fuzz_uninit")
  v = tf.Variable(tensor(spec))
  return v

def run(case):
  attrs = dict(case["attrs"])
  op = case["op"]
  keep = []  # the variable object: it owns the resource, so it must outlive the call

  def resource():
    return keep[0].handle if hasattr(keep[0], "handle") else keep[0]

  specs = {k: v for k, v in case.items() if k not in ("attrs", "variable", "variables") and
           isinstance(v, dict)}
  handles = []  # the sparse update ops' variables
  def call():
    # Built inside the call, so that under tf.function they are constants whose values the
    # shape functions see.
    inputs = {k: tensor(v) for k, v in specs.items()}
    if op == "DePooledEmbeddingLookup":
      return ops.de_pooled_embedding_lookup(inputs["params"], inputs["ids"],
                                            inputs["row_splits"], **attrs)
    if op == "DeResourcePooledEmbeddingLookup":
      return ops.de_resource_pooled_embedding_lookup(resource(), inputs["ids"],
                                                     inputs["row_splits"], **attrs)
    if op == "DePooledEmbeddingLookupGrad":
      return ops.de_pooled_embedding_lookup_grad(inputs["grad"], inputs["ids"],
                                                 inputs["row_splits"],
                                                 tf.constant(case["num_rows"], tf.int64), **attrs)
    if op == "DeWeightedPooledEmbeddingLookup":
      return ops.de_weighted_pooled_embedding_lookup(inputs["params"], inputs["ids"],
                                                     inputs["row_splits"], inputs["weights"],
                                                     **attrs)
    if op == "DeResourceWeightedPooledEmbeddingLookup":
      return ops.de_resource_weighted_pooled_embedding_lookup(
          resource(), inputs["ids"], inputs["row_splits"], inputs["weights"], **attrs)
    if op == "DeWeightedPooledEmbeddingLookupGrad":
      return ops.de_weighted_pooled_embedding_lookup_grad(
          inputs["grad"], inputs["ids"], inputs["row_splits"],
          tf.constant(case["num_rows"], tf.int64), inputs["weights"], **attrs)
    if op == "DeSparseRowSplits":
      return ops.de_sparse_row_splits(inputs["indices"], inputs["dense_shape"],
                                      **attrs)
    if op == "DeReadVariableNoCopy":
      return ops.de_read_variable_no_copy(resource(), **attrs)
    if op == "DeInitialIntegerLookupState":
      return ops.de_initial_integer_lookup_state(**attrs)
    if op == "DeValidateIntegerLookupState":
      return ops.de_validate_integer_lookup_state(inputs["state"], **attrs)
    if op == "DeSparseApplyLookupGrad":
      scalars = [inputs[k] for k in sorted(k for k in inputs if k.startswith("scalar"))]
      weights = [inputs["weights"]] if "weights" in inputs else []
      return ops.de_sparse_apply_lookup_grad(
          [h.handle if hasattr(h, "handle") else h for h in handles], inputs["grad"],
          inputs["ids"], inputs["row_splits"], tf.constant(case["num_rows"], tf.int64), weights,
          scalars, **attrs)
    if op.startswith("DeSparseApply"):
      snake = "de_sparse_apply_" + {"Sgd": "sgd", "Adagrad": "adagrad",
                                    "RowwiseAdagrad": "rowwise_adagrad",
                                    "LazyAdam": "lazy_adam"}[op[len("DeSparseApply"):]]
      scalars = [inputs[k] for k in sorted(k for k in inputs if k.startswith("scalar"))]
      return getattr(ops, snake)(*[h.handle if hasattr(h, "handle") else h for h in handles],
                                 inputs["indices"], inputs["grad"], *scalars)
    return ops.de_integer_lookup(resource(), inputs["keys"], **attrs)
  try:  # inputs first: a failure to build them is the harness's, not the op's
    for spec in specs.values():
      tensor(spec)
  except Exception as e:  # pylint: disable=broad-except
    return "harness: " + repr(e)[:300]
  try:
    if "variable" in case:
      keep.append(variable(case["variable"],
                           attrs.get("dtype", "int64")))
    for spec in case.get("variables", []):
      handles.append(variable(spec, case["dtype"]))
    if case.get("alias"):
      handles[1] = handles[0]
    fn = tf.function(call) if case["graph"] else call
    out = fn()
    if out is not None:
      tf.nest.map_structure(lambda t: t.numpy(), out)
    return "ok"
  except tf.errors.InternalError as e:
    return "internal: " + str(e)[:300]
  except tf.errors.OpError as e:
    return "error: " + type(e).__name__
  except (TypeError, ValueError) as e:
    return "error: " + type(e).__name__

for line in sys.stdin:
  print(json.dumps(run(json.loads(line))), flush=True)
'''


class Worker:
  """A process that runs cases; restarted after any case that kills it."""

  def __init__(self):
    self.process = None

  def _start(self):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=os.pathsep.join(sys.path))
    self.process = subprocess.Popen(
      [sys.executable, "-c", WORKER],
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      env=env,
    )

  def run(self, case):
    if self.process is None or self.process.poll() is not None:
      self._start()
    self.process.stdin.write(json.dumps(case) + "\n")
    self.process.stdin.flush()
    line = self.process.stdout.readline()
    if line:
      return json.loads(line)
    code = self.process.wait()
    stderr = self.process.stderr.read()[-1500:]
    self.process = None
    return f"crash: exit code {code}: {stderr}"

  def close(self):
    if self.process is not None and self.process.poll() is None:
      self.process.stdin.close()
      self.process.wait(timeout=60)


class RawOpFuzzTest(absltest.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.worker = Worker()

  @classmethod
  def tearDownClass(cls):
    cls.worker.close()
    super().tearDownClass()

  def test_known_crashers_raise(self):
    # Shapes whose products overflow int64 used to CHECK-fail inside TensorShape (SIGABRT).
    crashers = [
      {
        "op": "DePooledEmbeddingLookup",
        "graph": False,
        "attrs": {"combiner": "sum", "bounds_check": "error"},
        "params": {"dtype": "float32", "shape": [0, 2**62], "values": []},
        "ids": {"dtype": "int64", "shape": [0], "values": []},
        "row_splits": {"dtype": "int64", "shape": [5], "values": [0, 0, 0, 0, 0]},
      },
      {
        "op": "DeSparseRowSplits",
        "graph": True,
        "attrs": {"out_type": "int64"},
        "indices": {"dtype": "int64", "shape": [0, 2], "values": []},
        "dense_shape": {"dtype": "int64", "shape": [2], "values": [INT64_MAX, 3]},
      },
      {
        "op": "DePooledEmbeddingLookupGrad",
        "graph": False,
        "attrs": {"combiner": "mean", "bounds_check": "error", "T": "float32"},
        "grad": {"dtype": "float32", "shape": [1, 2**62], "values": []},
        "ids": {"dtype": "int64", "shape": [3], "values": [0, 1, 2]},
        "row_splits": {"dtype": "int64", "shape": [2], "values": [0, 3]},
        "num_rows": 2**62,
      },
    ]
    crashers[2]["grad"]["shape"] = [0, 2**62]
    crashers[2]["row_splits"] = {"dtype": "int64", "shape": [1], "values": [0]}
    for case in crashers:
      self.assertEqual("error: InvalidArgumentError", self.worker.run(case), json.dumps(case))

  @hypothesis.settings(
    max_examples=int(os.environ.get("DE_FUZZ_EXAMPLES", "1500")),
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(hypothesis.HealthCheck),
  )
  @hypothesis.given(cases())
  def test_no_case_kills_the_process_or_is_internal(self, case):
    result = self.worker.run(case)
    self.assertTrue(
      result == "ok" or result.startswith("error: "), f"{result}\ncase: {json.dumps(case)}"
    )


if __name__ == "__main__":
  absltest.main()
