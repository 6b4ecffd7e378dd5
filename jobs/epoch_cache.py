"""This rank's training rows, kept in memory after one full pass, so later epochs skip Ray Data.

Why: on a small corpus an epoch is a few dozen steps, and every epoch re-executes the Ray Data
plan (list files, read parquet, drop the held-out keys, split across ranks) in fresh task workers.
On the 2-core demo that re-execution took ~3.6 s of each ~4.7 s epoch and competed with the
training workers for the CPUs. A rank whose shard fits in `max_bytes` instead keeps the Arrow
batches of its first complete pass and serves every epoch as a seeded permutation of them.

- Order: the rows are sorted by key once, then permuted by `numpy.random.default_rng([seed, epoch, rank])`, so
  an epoch's order depends only on the rank's rows and the seed, not on the order Ray Data
  delivered them in; a resumed run that refills the cache serves the same epoch order again.
- Membership (`run.rank_rows`): under `streaming_split` the cache holds the rows Ray Data gave
  this rank; under `global_shuffle` it holds every rank's rows, permuted by (seed, epoch) alone,
  and the rank serves its slice (`epoch(part=(rank, world))`), so which rows a rank trains on
  depends only on the rows, the seed, the epoch and the number of ranks.
- The trainer fills the cache (`fill`) before the first epoch too, so that no epoch's order is
  the order the rows arrived in (`jobs.trainer._epoch_batches` says why).
- Bound: a shard over `max_bytes` stops being recorded at the first batch past the bound and
  streams from Ray Data every epoch, as without the cache (`max_bytes=0` disables it).
- What is cached is the pass *before* `jobs.elastic.unconsumed_batches` drops a resumed epoch's
  consumed keys and the partial last batch, so the cache holds the rank's whole shard (the
  trainer streams with `drop_last=False` for this: a cache of the full batches only would keep
  the first pass's subset for good).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa


class EpochCache:
    def __init__(self, *, max_bytes: int, key_column: str) -> None:
        if max_bytes < 0:
            raise ValueError(f"EpochCache max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self.key_column = key_column
        self._tables: list[pa.Table] = []
        self._bytes = 0
        self._overflowed = max_bytes == 0
        self._table: pa.Table | None = None  # sorted by key, set when a pass completed

    @property
    def ready(self) -> bool:
        """A whole pass is cached: `epoch` can serve batches."""
        return self._table is not None

    @property
    def enabled(self) -> bool:
        """False once the shard proved larger than the bound (or the bound is 0)."""
        return not self._overflowed

    @property
    def num_rows(self) -> int:
        return 0 if self._table is None else self._table.num_rows

    def record(self, batches: Iterable[pa.Table]) -> Iterator[pa.Table]:
        """Yield `batches` unchanged, keeping them while under the bound; a pass iterated to its end
        makes the cache ready. A pass abandoned early (the run reached max_steps) leaves it unready."""
        if self.ready or self._overflowed:
            yield from batches
            return
        self._tables, self._bytes = [], 0
        for batch in batches:
            if not self._overflowed:
                self._bytes += batch.nbytes
                if self._bytes > self.max_bytes:
                    self._overflowed, self._tables = True, []
                else:
                    self._tables.append(batch)
            yield batch
        if not self._overflowed:
            table = pa.concat_tables(self._tables) if self._tables else None
            self._tables = []
            if table is not None:
                self._table = table.sort_by(self.key_column)

    def fill(self, batches: Iterable[pa.Table]) -> bool:
        """Read a whole pass into the cache without yielding it (a run resumed past its first
        epoch); False when the shard is over the bound (the caller then streams)."""
        for _ in self.record(batches):
            if self._overflowed:
                return False
        return self.ready

    def epoch(self, *, seed: Sequence[int], batch_size: int,
              part: tuple[int, int] = (0, 1)) -> Iterator[pa.Table]:  # fmt: skip
        """The cached rows in a seeded permutation, in batches of `batch_size`, the last partial
        batch dropped (as `iter_batches(drop_last=True)`).

        `part=(rank, world)`: the cache holds every rank's rows (`run.rank_rows=global_shuffle`)
        and this rank takes every world-th row of the permutation, after dropping the last
        `num_rows % world` so that every rank gets as many rows (DistributedSampler with
        drop_last): the ranks' parts of one epoch are disjoint and together the whole permutation."""
        if self._table is None:
            raise RuntimeError("EpochCache.epoch before a whole pass was recorded")
        rank, world = part
        if not 0 <= rank < world:
            raise ValueError(f"EpochCache.epoch part: need 0 <= rank < world, got {part}")
        order = np.random.default_rng(list(seed)).permutation(self._table.num_rows)
        order = order[: len(order) - len(order) % world][rank::world]
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield self._table.take(order[start : start + batch_size])
