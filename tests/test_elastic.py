"""Elastic resume (`jobs.elastic`): the batch layout and the data-position remap. The end-to-end
case (stage 2 written by 2 workers, its driver killed, resumed on 1 through DeepSpeed's universal
checkpoint) is `tests/test_jobs_faults.py::test_relaunched_driver_resumes_the_same_run_on_another_number_of_workers`."""

from __future__ import annotations

import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.config import ScalingSettings
from jobs.elastic import (
    KEYS_FILE,
    BatchLayout,
    batch_layout,
    load_consumed_keys,
    unconsumed_batches,
    worker_bounds,
)


# ---- batch layout ------------------------------------------------------------------------------
@pytest.mark.parametrize("micro", [1, 3, 4, 8, 12, 64])
@pytest.mark.parametrize("configured", [1, 2, 6, 8])
@pytest.mark.parametrize("world", [1, 2, 3, 5, 7, 8, 16])
def test_batch_layout_keeps_the_global_batch_or_says_which_worker_counts_can(
    micro, configured, world
):
    """On any number of ranks the layout multiplies back to the configured global batch with a
    micro batch no larger than the configured one, or the error lists the worker counts that work."""
    global_batch = micro * configured
    try:
        layout = batch_layout(global_batch, micro, world)
    except ValueError as err:
        assert global_batch % world != 0 and "worker counts that can" in str(err)
        return
    assert layout.micro_batch * layout.accumulation * world == global_batch
    assert 1 <= layout.micro_batch <= micro
    if world == configured:
        assert layout == BatchLayout(global_batch, micro, 1, world)


def test_batch_layout_prefers_the_configured_micro_batch_and_accumulates():
    """2 x 4 on 1 rank accumulates 2 micro batches of 4; 64 x 8 on 56 ranks cannot be split evenly."""
    assert batch_layout(8, 4, 1) == BatchLayout(8, 4, 2, 1)
    assert batch_layout(8, 4, 4) == BatchLayout(8, 2, 1, 4)
    with pytest.raises(ValueError, match=r"512 cannot be split over 56 workers.*\[1, 2, 4, 8"):
        batch_layout(512, 8, 56)


def test_num_workers_takes_an_int_or_a_min_max_range():
    """An int is a fixed size, [min, max] a range; anything else names the field."""
    assert worker_bounds(4) == (4, 4) and worker_bounds([2, 8]) == (2, 8)
    assert ScalingSettings(num_workers=[2, 8]).num_workers == [2, 8]
    assert ScalingSettings(num_workers=[3, 3]).num_workers == 3
    for bad in (0, [4, 2], [1, 2, 3], "2", True, [1.5, 2]):
        with pytest.raises(ValueError, match="scaling.num_workers"):
            ScalingSettings(num_workers=bad)


# ---- data position -----------------------------------------------------------------------------
def _batches(keys: list[str], size: int) -> list[pa.Table]:
    return [pa.table({"key": keys[i : i + size], "x": list(range(i, min(i + size, len(keys))))})
            for i in range(0, len(keys), size)]  # fmt: skip


@pytest.mark.parametrize("seed", range(40))
def test_unconsumed_batches_yield_every_other_row_once_in_order(seed):
    """Dropping a consumed set leaves exactly the other rows, in their order, in full batches of `cut`."""
    rng = random.Random(seed)
    n, size, cut = rng.randint(0, 60), rng.randint(1, 8), rng.randint(1, 8)
    keys = [f"k{i:03d}" for i in range(n)]
    consumed = set(rng.sample(keys, rng.randint(0, n)))
    out = list(
        unconsumed_batches(_batches(keys, size), pa.array(sorted(consumed), pa.string()), cut)
    )
    got = [k for t in out for k in t.column("key").to_pylist()]
    rest = [k for k in keys if k not in consumed]
    assert all(t.num_rows == cut for t in out)
    assert got == rest[: len(rest) // cut * cut]  # nothing consumed: the stream's full batches


def test_consumed_keys_are_the_union_of_every_rank(tmp_path):
    for rank, keys in enumerate([["a", "b"], ["c"]]):
        pq.write_table(pa.table({"key": keys}), tmp_path / KEYS_FILE.format(rank=rank))
    assert sorted(load_consumed_keys(tmp_path).to_pylist()) == ["a", "b", "c"]
    assert load_consumed_keys(tmp_path / "none").to_pylist() == []
