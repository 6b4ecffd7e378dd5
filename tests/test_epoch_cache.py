"""`jobs.epoch_cache.EpochCache`: later epochs from memory, in an order that depends on the rows
and the seed only, bounded, and never serving a partial pass."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from jobs.epoch_cache import EpochCache

KEY = "key"


def batches(keys: list[str], size: int) -> list[pa.Table]:
    table = pa.table({KEY: keys, "x": np.arange(len(keys), dtype=np.float32)})
    return [table.slice(i, size) for i in range(0, len(keys) - size + 1, size)]


def keys_of(tables) -> list[str]:
    return [k for t in tables for k in t.column(KEY).to_pylist()]


def test_a_recorded_pass_is_yielded_unchanged_then_served_as_a_seeded_permutation():
    keys = [f"{i:04d}" for i in range(40)]
    cache = EpochCache(max_bytes=1 << 20, key_column=KEY)
    passed = keys_of(cache.record(batches(keys, 8)))
    assert passed == keys and cache.ready and cache.num_rows == 40
    first = list(cache.epoch(seed=(0, 1, 0), batch_size=8))
    assert [t.num_rows for t in first] == [8] * 5
    assert sorted(keys_of(first)) == keys and keys_of(first) != keys  # every row once, shuffled
    assert keys_of(cache.epoch(seed=(0, 1, 0), batch_size=8)) == keys_of(first)  # reproducible
    assert keys_of(cache.epoch(seed=(0, 2, 0), batch_size=8)) != keys_of(first)  # per epoch


@pytest.mark.parametrize("seed", range(10))
def test_the_epoch_order_depends_on_the_rows_not_on_their_arrival_order(seed):
    """A resumed run refills the cache from a pass that may arrive in another order (Ray Data's
    local shuffle is seeded by epoch): the served order must be the same."""
    rng = np.random.default_rng(seed)
    keys = [f"{i:04d}" for i in range(int(rng.integers(10, 60)))]
    shuffled = list(rng.permutation(keys))
    a, b = (
        EpochCache(max_bytes=1 << 20, key_column=KEY),
        EpochCache(max_bytes=1 << 20, key_column=KEY),
    )
    list(a.record(batches(keys, 1)))
    assert b.fill(batches(shuffled, 1))
    assert keys_of(a.epoch(seed=(seed, 3, 1), batch_size=4)) == keys_of(
        b.epoch(seed=(seed, 3, 1), batch_size=4)
    )


def test_the_last_partial_batch_is_dropped():
    cache = EpochCache(max_bytes=1 << 20, key_column=KEY)
    list(cache.record(batches([f"{i}" for i in range(10)], 1)))
    assert [t.num_rows for t in cache.epoch(seed=(0,), batch_size=4)] == [4, 4]


def test_an_abandoned_pass_leaves_the_cache_unready():
    """The run reached max_steps mid-epoch: a partial pass must never be served as an epoch."""
    cache = EpochCache(max_bytes=1 << 20, key_column=KEY)
    for i, _ in enumerate(cache.record(batches([f"{i}" for i in range(40)], 8))):
        if i == 2:
            break
    assert not cache.ready and cache.enabled
    with pytest.raises(RuntimeError, match="before a whole pass"):
        next(cache.epoch(seed=(0,), batch_size=8))
    assert keys_of(
        cache.record(batches([f"{i}" for i in range(40)], 8))
    )  # a later pass records anew
    assert cache.ready and cache.num_rows == 40


def test_a_shard_over_the_bound_streams_every_pass_and_nothing_is_lost():
    keys = [f"{i:04d}" for i in range(64)]
    one_batch = batches(keys, 8)[0].nbytes
    cache = EpochCache(max_bytes=3 * one_batch, key_column=KEY)
    assert keys_of(cache.record(batches(keys, 8))) == keys  # every row still reaches training
    assert not cache.ready and not cache.enabled
    assert not cache.fill(batches(keys, 8))
    assert keys_of(cache.record(batches(keys, 8))) == keys


def test_zero_disables_and_negative_is_refused():
    cache = EpochCache(max_bytes=0, key_column=KEY)
    assert not cache.enabled
    list(cache.record(batches(["a", "b"], 1)))
    assert not cache.ready
    with pytest.raises(ValueError, match="max_bytes"):
        EpochCache(max_bytes=-1, key_column=KEY)


class SeededShard:
    """A DataIterator's `iter_batches` as the trainer calls it: a seeded local shuffle of the rows,
    in batches of `batch_size`, the partial last one kept or dropped per `drop_last`."""

    def __init__(self, keys: list[str]) -> None:
        self.table = pa.table({KEY: keys, "x": np.arange(len(keys), dtype=np.float32)})

    def iter_batches(self, *, batch_size, drop_last, batch_format, local_shuffle_buffer_size,
                     local_shuffle_seed):  # fmt: skip
        assert batch_format == "pyarrow"
        order = np.random.default_rng(local_shuffle_seed).permutation(self.table.num_rows)
        rows = self.table.take(order)
        end = rows.num_rows - rows.num_rows % batch_size if drop_last else rows.num_rows
        return iter([rows.slice(i, min(batch_size, end - i)) for i in range(0, end, batch_size)])


def trained_epoch(shard, cache, *, epoch, consumed=(), micro=16, seed=0, rank=1,
                  world=None) -> list[list[str]]:  # fmt: skip
    """The batches the training loop steps on in `epoch` (jobs.trainer's own composition);
    `world`: run.rank_rows=global_shuffle (the shard is the whole training set)."""
    from jobs.elastic import unconsumed_batches
    from jobs.trainer import _epoch_batches

    batches = _epoch_batches(shard, cache, micro=micro, seed=seed, epoch=epoch, rank=rank,
                             world=world)  # fmt: skip
    return [t.column(KEY).to_pylist()
            for t in unconsumed_batches(batches, pa.array(list(consumed), pa.string()), micro)]  # fmt: skip


def test_a_run_resumed_in_a_cached_epoch_steps_on_the_batches_of_the_run_it_resumes():
    """43 rows in batches of 16: each pass drops 11. The cache must still hold all 43 (a cache of
    the first pass's 32 kept those 11 out of training for good, and a run resumed at the step-5
    checkpoint, mid epoch 2, refilled another 32 and stepped on other batches than the clean run:
    how tests/test_jobs_faults.py failed once tiny_stage1 took 16 per worker)."""
    shard = SeededShard([f"{i:04d}" for i in range(43)])
    clean_cache = EpochCache(max_bytes=1 << 20, key_column=KEY)
    clean = [trained_epoch(shard, clean_cache, epoch=e) for e in range(4)]
    assert [len(e) for e in clean] == [2, 2, 2, 2] and all(len(b) == 16 for e in clean for b in e)
    assert clean_cache.num_rows == 43
    later = {k for e in clean[1:] for b in e for k in b}
    assert later - {k for b in clean[0] for k in b}, "rows dropped by epoch 0 are never trained"

    resumed_cache = EpochCache(max_bytes=1 << 20, key_column=KEY)
    resumed = trained_epoch(shard, resumed_cache, epoch=2, consumed=clean[2][0])
    assert resumed == clean[2][1:]
    assert trained_epoch(shard, resumed_cache, epoch=3) == clean[3]


def test_every_epoch_including_the_first_is_independent_of_the_rows_arrival_order():
    """Two ingests of the same images give shards whose rows arrive in different orders (img2dataset
    writes them as downloads finish). The first epoch too comes from the filled cache, so both step
    on the same batches in every epoch: streamed, the first epoch differed, and so did the
    model the demo's stage 1 trained on each ingest."""
    keys = [f"{i:04d}" for i in range(43)]
    shuffled = list(np.random.default_rng(7).permutation(keys))
    runs = []
    for order in (keys, shuffled):
        shard, cache = SeededShard(order), EpochCache(max_bytes=1 << 20, key_column=KEY)
        runs.append([trained_epoch(shard, cache, epoch=e) for e in range(3)])
    assert runs[0] == runs[1]
    assert runs[0][0] != runs[0][1], "epochs must still differ from each other"


def test_a_shard_over_the_bound_streams_its_first_epoch_whole():
    """Over the bound, the aborted fill costs a partial read, and the first epoch still streams
    every full batch of the shard."""
    shard = SeededShard([f"{i:04d}" for i in range(43)])
    cache = EpochCache(max_bytes=64, key_column=KEY)  # smaller than one batch of 16 rows
    epoch0 = trained_epoch(shard, cache, epoch=0)
    assert not cache.enabled and [len(b) for b in epoch0] == [16, 16]
    assert len({k for b in epoch0 for k in b}) == 32


def global_epochs(keys: list[str], *, world: int, epochs: int, micro: int = 4, consumed=(),
                  arrival_seed: int | None = None) -> list[list[list[list[str]]]]:  # fmt: skip
    """[rank][epoch] -> batches under run.rank_rows=global_shuffle: every rank reads the whole
    training set (in its own arrival order when `arrival_seed`) into its own cache."""
    out = []
    for rank in range(world):
        order = keys
        if arrival_seed is not None:
            order = list(np.random.default_rng([arrival_seed, rank]).permutation(keys))
        shard, cache = SeededShard(order), EpochCache(max_bytes=1 << 20, key_column=KEY)
        out.append([trained_epoch(shard, cache, epoch=e, micro=micro, rank=rank, world=world,
                                  consumed=consumed if e == 0 else ()) for e in range(epochs)])  # fmt: skip
    return out


@pytest.mark.parametrize("world", [1, 2, 3])
def test_global_shuffle_ranks_step_on_disjoint_equal_slices_of_one_permutation(world):
    """Under global_shuffle every rank holds the whole training set; in each epoch the ranks' rows
    are disjoint, equally many (so every rank steps equally often), and all rows but fewer than
    world x micro; epochs differ; and none of it depends on the order the rows arrived in."""
    keys = [f"{i:04d}" for i in range(43)]
    runs = global_epochs(keys, world=world, epochs=3)
    for epoch in range(3):
        parts = [{k for b in runs[r][epoch] for k in b} for r in range(world)]
        assert len({len(runs[r][epoch]) for r in range(world)}) == 1, "ranks step unequally"
        assert sum(len(p) for p in parts) == len(set().union(*parts)), "a row on two ranks"
        assert len(keys) - len(set().union(*parts)) < world * 4
    assert runs[0][0] != runs[0][1], "epochs must differ"
    assert global_epochs(keys, world=world, epochs=3, arrival_seed=5) == runs


def test_global_shuffle_resumed_on_fewer_ranks_trains_every_remaining_row_once():
    """Keys consumed by 3 ranks before a checkpoint, resumed on 2 (an elastic restart): the 2 ranks
    step on the other rows of the epoch once each, none of the consumed ones, and leave out only
    what their partial last batches drop."""
    keys = [f"{i:04d}" for i in range(48)]
    before = global_epochs(keys, world=3, epochs=1)
    consumed = [k for r in range(3) for k in before[r][0][0]]  # each rank's first batch
    after = global_epochs(keys, world=2, epochs=1, consumed=consumed)
    rest = [k for r in range(2) for b in after[r][0] for k in b]
    assert len(rest) == len(set(rest)) and not set(rest) & set(consumed)
    assert len(keys) - len(consumed) - len(rest) < 2 * 4


def test_global_shuffle_over_the_cache_bound_is_refused():
    """A whole training set over run.epoch_cache_mb cannot be served as a slice: an error that
    says which settings to change, not every rank training on every row."""
    shard = SeededShard([f"{i:04d}" for i in range(43)])
    with pytest.raises(ValueError, match="run.rank_rows=streaming_split"):
        trained_epoch(shard, EpochCache(max_bytes=64, key_column=KEY), epoch=0, rank=0, world=2)
