"""Elastic resume: a run restarted on another number of workers goes on from its last checkpoint.

On 64 GPUs, losing a node means waiting for it or going on with 56. Ray Train V2 restarts the
worker group at any size in `scaling.num_workers: [min, max]` (and a relaunch may simply ask for
another `scaling.num_workers`), but three things written by N ranks do not fit M != N ranks:

- **DeepSpeed state.** A ZeRO-1/2 checkpoint holds each rank's partition of the fp32 master weights
  and optimizer moments (`zero_pp_rank_<r>_*optim_states.pt`); DeepSpeed loads it on the same data-
  parallel degree only. `to_universal` converts it once (DeepSpeed's own
  `deepspeed.checkpoint.ds_to_universal`: per-parameter fp32 weights and moments, no partitioning)
  into `<run>/universal/<tag>`, which every rank then loads with `checkpoint.load_universal`. Why
  DeepSpeed's converter and not our own consolidation: it is the format DeepSpeed itself reloads
  into any topology, optimizer moments and step counts included.
- **The global batch.** Optimization is defined by the global batch (`batch_size_per_worker` x the
  configured, or largest, number of workers); `batch_layout` keeps it on M workers by choosing the
  micro batch and the gradient accumulation (refusing, with the worker counts that work, when it
  cannot be split evenly).
- **The data position.** Which rows a rank gets depends on the number of ranks (its slice of the
  epoch's permutation under `run.rank_rows=global_shuffle`, its `streaming_split` shard
  otherwise), so "rank r consumed k batches" means nothing on M ranks.
  Every rank records the keys it consumed in the current epoch (`consumed_keys_rank<r>.parquet` in
  the checkpoint); a resumed rank drops the union of them from its new shard before batching, so no
  row of the epoch is seen twice or skipped (on the same number of ranks this reproduces exactly
  the batches the run would have seen: a rank's shard minus its own consumed prefix).
"""

from __future__ import annotations

import json
import logging
import types
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.storage import RunFolder

logger = logging.getLogger(__name__)
KEY_COLUMN = "key"
KEYS_FILE = "consumed_keys_rank{rank}.parquet"
UNIVERSAL_DIR = "universal"
RESIZE_LOG = "resizes.jsonl"
"""One line per resume on another number of workers, in the run folder (what, when, digests)."""


@dataclass(frozen=True)
class BatchLayout:
    """How a global batch is laid out over `world` ranks: micro batch x accumulation x world."""

    global_batch: int
    micro_batch: int
    accumulation: int
    world: int

    def __post_init__(self) -> None:
        assert self.micro_batch * self.accumulation * self.world == self.global_batch, self


def worker_bounds(num_workers: Any) -> tuple[int, int]:
    """`scaling.num_workers` as (min, max): an int is a fixed size, `[min, max]` an elastic range."""
    if isinstance(num_workers, bool):
        raise ValueError(f"scaling.num_workers must be an int or [min, max], got {num_workers!r}")
    if isinstance(num_workers, int):
        low = high = num_workers
    elif (
        isinstance(num_workers, list | tuple)
        and len(num_workers) == 2
        and all(isinstance(n, int) and not isinstance(n, bool) for n in num_workers)
    ):
        low, high = num_workers
    else:
        raise ValueError(f"scaling.num_workers must be an int or [min, max], got {num_workers!r}")
    if low < 1 or high < low:
        raise ValueError(f"scaling.num_workers must be >= 1 (and min <= max), got {num_workers!r}")
    return low, high


def batch_layout(global_batch: int, max_micro_batch: int, world: int) -> BatchLayout:
    """The layout of `global_batch` on `world` ranks with the largest micro batch that fits in
    `max_micro_batch` (the configured per-worker batch: memory was sized for it) and the fewest
    accumulation steps; a ValueError names the worker counts that can keep this global batch."""
    for accumulation in range(1, global_batch + 1):
        per_rank, rest = divmod(global_batch, world * accumulation)
        if rest == 0 and 1 <= per_rank <= max_micro_batch:
            return BatchLayout(global_batch, per_rank, accumulation, world)
        if per_rank == 0:
            break
    fits = [n for n in range(1, min(global_batch, 4096) + 1) if global_batch % n == 0]
    raise ValueError(f"the global batch of {global_batch} cannot be split over {world} workers "
                     f"(micro batch <= {max_micro_batch}); worker counts that can: {fits}")  # fmt: skip


def checkpoint_info() -> dict[str, Any]:
    """The client state that `ds_to_universal` requires of a checkpoint it converts."""
    from deepspeed.checkpoint.constants import (
        UNIVERSAL_CHECKPOINT_INFO,
        UNIVERSAL_CHECKPOINT_VERSION_KEY,
        UNIVERSAL_CHECKPOINT_VERSION_VALUE,
    )

    return {
        UNIVERSAL_CHECKPOINT_INFO: {
            UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE
        }
    }


def to_universal(checkpoint_dir: Path, tag: str, run_dir: Path) -> Path:
    """Convert `<checkpoint_dir>/<tag>` (a DeepSpeed ZeRO checkpoint of any number of ranks) into
    `<run_dir>/universal/<tag>` once; returns the folder to pass as `load_dir` with `tag`.
    Called by rank 0 only; the other ranks wait at a barrier. The run folder is on the storage
    every worker sees (the same one Ray Train writes checkpoints to)."""
    from deepspeed.checkpoint import ds_to_universal

    out = run_dir / UNIVERSAL_DIR
    target = out / tag
    done = target / ".complete"
    if done.is_file():
        return out
    args = types.SimpleNamespace(
        input_folder=str(checkpoint_dir / tag), output_folder=str(target), num_extract_workers=1,
        num_merge_workers=1, keep_temp_folder=False, strict=True,
        inject_missing_state=True,  # checkpoints written before checkpoint_info() was saved
    )  # fmt: skip
    ds_to_universal.main(args)
    done.write_text("")
    return out


def save_consumed_keys(directory: Path, rank: int, keys: list[str]) -> None:
    table = pa.table({KEY_COLUMN: pa.array(keys, pa.string())})
    pq.write_table(table, directory / KEYS_FILE.format(rank=rank))


def load_consumed_keys(directory: Path) -> pa.Array:
    """The union (as a list: duplicates would be a bug the tests look for) of every rank's keys."""
    files = sorted(directory.glob(KEYS_FILE.format(rank="*")))
    if not files:
        return pa.array([], pa.string())
    return pa.concat_arrays([pq.read_table(f).column(KEY_COLUMN).combine_chunks() for f in files])


def full_batches(batches: Iterable[pa.Table], size: int) -> Iterator[pa.Table]:
    """`batches` re-cut into batches of exactly `size` rows, the last partial one dropped (what
    `iter_batches(drop_last=True)` does); a batch already of `size` passes through uncopied."""
    pending: list[pa.Table] = []
    rows = 0
    for batch in batches:
        if not rows and batch.num_rows == size:
            yield batch
            continue
        if batch.num_rows:
            pending.append(batch)
            rows += batch.num_rows
        while rows >= size:
            table = pa.concat_tables(pending)
            yield table.slice(0, size)
            rest = table.slice(size)
            pending, rows = ([rest] if rest.num_rows else []), rest.num_rows


def unconsumed_batches(
    batches: Iterable[pa.Table], consumed: pa.Array, size: int
) -> Iterator[pa.Table]:
    """`batches` without the rows whose key is in `consumed`, cut into batches of `size` (the
    last partial one dropped, as `drop_last=True` does)."""
    if len(consumed):
        batches = (
            batch.filter(pc.invert(pc.is_in(batch.column(KEY_COLUMN), value_set=consumed)))
            for batch in batches
        )
    yield from full_batches(batches, size)


def record_resize(folder: RunFolder, record: dict[str, Any]) -> None:
    """Append a resize to the run folder's log (read, append, write back: an object store has no
    append; one writer, rank 0)."""
    before = folder.read_text(RESIZE_LOG) or ""
    folder.write_text(RESIZE_LOG, before + json.dumps(record, sort_keys=True) + "\n")
    logger.warning("elastic resume: %s", record)
