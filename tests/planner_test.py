"""Tests of the table placement planner: invariants over strategies, thresholds, worker counts."""

import random

from absl.testing import absltest
from absl.testing import parameterized

from distributed_embeddings.python.layers import planner
from distributed_embeddings.python.layers.planner import TableSpec


def _random_tables(seed, count):
  rng = random.Random(seed)
  return [
    TableSpec(rng.choice([3, 10, 100, 1000, 5000]), rng.choice([1, 2, 4, 8, 16, 33, 64]))
    for _ in range(count)
  ]


class PlannerInvariantTest(parameterized.TestCase):
  def check_invariants(self, plan, tables, column_slice_threshold):
    placed = {}
    for worker in plan.shards:
      for shard in worker:
        placed.setdefault(shard.table, []).append(shard)
    for t, spec in enumerate(tables):
      if t in plan.data_parallel_tables:
        self.assertNotIn(t, placed, f"replicated table {t} also sharded")
        continue
      shards = placed[t]
      kinds = {s.kind for s in shards}
      self.assertLen(kinds, 1, f"table {t} mixes {kinds}")
      kind = kinds.pop()
      if kind == "table":
        self.assertLen(shards, 1)
        self.assertEqual((spec.input_dim, spec.output_dim), (shards[0].rows, shards[0].width))
      elif kind == "column_slice":
        count = len(shards)
        # A power of two, or capped at the worker count.
        self.assertLessEqual(count, plan.world_size)
        if count < plan.world_size:
          self.assertEqual(0, count & (count - 1), f"{count} column slices is no power of two")
        cols = sorted((s.col_begin, s.col_end) for s in shards)
        self.assertEqual(0, cols[0][0])
        self.assertEqual(spec.output_dim, cols[-1][1])
        for (_, end), (begin, _) in zip(cols, cols[1:]):
          self.assertEqual(end, begin, f"table {t} columns overlap or leave a gap")
        self.assertTrue(all(s.rows == spec.input_dim for s in shards))
        if (
          column_slice_threshold is not None
          and count * 2 <= spec.output_dim
          and count < plan.world_size
        ):
          self.assertLessEqual(
            max(s.size for s in shards), column_slice_threshold * 1.5 + spec.input_dim
          )
      else:
        self.assertLen(shards, plan.world_size, "row slices go to every worker")
        rows = sorted((s.row_begin, s.row_end) for s in shards)
        self.assertEqual((0, spec.input_dim), (rows[0][0], rows[-1][1]))
        for (_, end), (begin, _) in zip(rows, rows[1:]):
          self.assertEqual(end, begin)
        self.assertTrue(all(s.width == spec.output_dim for s in shards))
    replicated = sum(tables[t].size for t in plan.data_parallel_tables)
    for worker, nbytes in zip(plan.shards, plan.bytes_per_worker()):
      self.assertEqual(4 * (sum(s.size for s in worker) + replicated), nbytes)

  @parameterized.product(
    strategy=planner.STRATEGIES,
    world_size=list(range(1, 9)),
    thresholds=[
      (None, None, None),
      (2000, None, None),
      (None, 20000, None),
      (None, None, 500),
      (1000, 40000, 100),
    ],
  )
  def test_every_table_is_placed_exactly_once(self, strategy, world_size, thresholds):
    column, row, data_parallel = thresholds
    for seed in range(4):
      tables = _random_tables(seed, 1 + seed * 3)
      plan = planner.make_plan(
        tables,
        world_size,
        strategy,
        column_slice_threshold=column,
        row_slice_threshold=row,
        data_parallel_threshold=data_parallel,
      )
      self.check_invariants(plan, tables, column)
      if world_size == 1:
        self.assertEqual([], plan.data_parallel_tables)
        self.assertTrue(all(s.kind == "table" for s in plan.shards[0]))

  def test_more_workers_than_tables_slices_columns_automatically(self):
    tables = [TableSpec(100, 64), TableSpec(50, 16)]
    plan = planner.make_plan(tables, 8)
    self.assertTrue(all(plan.shards), "every worker holds a shard")
    self.check_invariants(plan, tables, None)

  def test_basic_is_round_robin_in_order(self):
    tables = [TableSpec(10, 4) for _ in range(5)]
    plan = planner.make_plan(tables, 2, "basic")
    self.assertEqual([[0, 2, 4], [1, 3]], [[s.table for s in w] for w in plan.shards])

  def test_memory_balanced_is_round_robin_by_size(self):
    tables = [TableSpec(10, 4), TableSpec(1000, 4), TableSpec(100, 4), TableSpec(500, 4)]
    plan = planner.make_plan(tables, 2, "memory_balanced")
    self.assertEqual([[1, 2], [0, 3]], [[s.table for s in w] for w in plan.shards])

  def test_memory_optimized_balances_load(self):
    sizes = [700, 600, 500, 400, 300, 200, 100, 100]
    tables = [TableSpec(s, 1) for s in sizes]
    for world_size in (2, 3, 4):
      loads = [
        sum(s.size for s in w)
        for w in planner.make_plan(tables, world_size, "memory_optimized").shards
      ]
      self.assertLessEqual(max(loads) - min(loads), max(sizes))
      basic = [sum(s.size for s in w) for w in planner.make_plan(tables, world_size).shards]
      self.assertLessEqual(max(loads), max(basic))

  def test_balanced_spreads_small_tables_by_output_width(self):
    # Four large tables of unequal size and twelve small ones, all of width 16, on four workers.
    # 'memory_optimized' gives every small table to the worker with the smallest large one (its
    # all-to-all block, which every worker pads to, is 13 tables wide); 'balanced' gives each
    # worker three, at the cost of three small tables' memory.
    large = [TableSpec(rows, 16) for rows in (100_000, 90_000, 80_000, 70_000)]
    tables = large + [TableSpec(100, 16) for _ in range(12)]
    widths = lambda plan: sorted(sum(s.width for s in w) for w in plan.shards)
    peak = lambda plan: max(plan.bytes_per_worker())
    optimized = planner.make_plan(tables, 4, "memory_optimized")
    balanced = planner.make_plan(tables, 4, "balanced")
    self.assertEqual([16, 16, 16, 13 * 16], widths(optimized))
    self.assertEqual([64, 64, 64, 64], widths(balanced))
    self.assertLessEqual(peak(balanced), peak(optimized) + 4 * 3 * 100 * 16)
    self.assertEqual(
      [[t] for t in range(4)], [[s.table for s in w if s.table < 4] for w in balanced.shards]
    )

  def test_balanced_counts_a_shared_table_once_per_input(self):
    # Three equal tables on two workers, table 0 read by two inputs: its rows go out twice, so
    # it is as wide as tables 1 and 2 together.
    tables = [TableSpec(20, 4)] * 3
    plan = planner.make_plan(tables, 2, "balanced", input_table_map=[0, 1, 2, 0])
    self.assertEqual([[0], [1, 2]], [[s.table for s in w] for w in plan.shards])
    unshared = planner.make_plan(tables, 2, "balanced")
    self.assertEqual([[0, 2], [1]], [[s.table for s in w] for w in unshared.shards])

  def test_balanced_puts_slices_of_a_table_on_different_workers(self):
    # Two slices of 3000 elements (table 0) and two of 1000 (table 1) on three workers: by the
    # two loads alone both slices of table 1 would join the third worker.
    tables = [TableSpec(3000, 2), TableSpec(1000, 2)]
    plan = planner.make_plan(tables, 3, "balanced", column_slice_threshold=1000)
    self.assertEqual([[0, 1], [0], [1]], [[s.table for s in w] for w in plan.shards])
    self.assertTrue(all(s.kind == "column_slice" for w in plan.shards for s in w))

  def test_column_slices_never_outnumber_workers(self):
    # 800 elements under a threshold of 45 would want 16 slices; width 8 allows 8; the worker
    # count caps them, and no worker holds two slices of one table.
    tables = [TableSpec(100, 8), TableSpec(5, 8), TableSpec(10, 8), TableSpec(25, 4)]
    for world_size, strategy in ((2, "basic"), (3, "memory_balanced"), (4, "memory_balanced")):
      plan = planner.make_plan(tables, world_size, strategy, column_slice_threshold=45)
      slices = [s for w in plan.shards for s in w if s.table == 0]
      self.assertLen(slices, world_size)
      self.assertEqual(8, sum(s.width for s in slices))
      for worker in plan.shards:
        tables_here = [s.table for s in worker]
        self.assertEqual(len(tables_here), len(set(tables_here)))

  def test_shared_tables_through_input_table_map(self):
    plan = planner.make_plan([TableSpec(10, 4), TableSpec(20, 4)], 2, input_table_map=[0, 1, 0, 0])
    self.assertEqual([0, 1, 0, 0], plan.input_table_map)

  def test_plan_prints_every_worker(self):
    plan = planner.make_plan(
      [TableSpec(1000, 8), TableSpec(10, 8), TableSpec(3000, 64)],
      3,
      column_slice_threshold=50000,
      data_parallel_threshold=100,
    )
    text = str(plan)
    for rank in range(3):
      self.assertIn(f"worker {rank}:", text)
    self.assertIn("data parallel", text)
    self.assertIn("cols [", text)

  def test_bad_arguments(self):
    tables = [TableSpec(10, 4)]
    cases = [
      (dict(strategy="random"), "'strategy' must be one of"),
      (dict(column_slice_threshold=0), "'column_slice_threshold' must be None or a positive"),
      (dict(row_slice_threshold=-5), "'row_slice_threshold'"),
      (dict(data_parallel_threshold=1.5), "'data_parallel_threshold'"),
      (dict(input_table_map=[1]), r"input_table_map\[0\] = 1"),
    ]
    for kwargs, message in cases:
      with self.assertRaisesRegex(ValueError, message):
        planner.make_plan(tables, 2, **kwargs)
    with self.assertRaisesRegex(ValueError, "tables \\[1\\] are unused"):
      planner.make_plan(tables * 2, 2, input_table_map=[0, 0])
    with self.assertRaisesRegex(ValueError, "'world_size' must be a positive integer"):
      planner.make_plan(tables, 0)
    with self.assertRaisesRegex(ValueError, "at least one table"):
      planner.make_plan([], 2)


if __name__ == "__main__":
  absltest.main()
