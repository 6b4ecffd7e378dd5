"""The held-out split of pipelines.datasets: a pure function of the row key that the training filter
(`drop_holdout`) and the in-job eval (`load_holdout`) agree on."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.datasets import drop_holdout, is_holdout, load_holdout

KEYS = [f"{i:09d}" for i in range(10_000)]


def test_is_holdout_is_deterministic_and_per_key():
    """A key's split is the same on every call, alone or in any batch, and in a process with another hash seed."""
    mask = is_holdout(KEYS, 0.1)
    assert mask.dtype == bool and mask.shape == (len(KEYS),)
    assert np.array_equal(mask, is_holdout(KEYS, 0.1))
    assert np.array_equal(mask[::-1], is_holdout(KEYS[::-1], 0.1))
    assert [bool(is_holdout([k], 0.1)[0]) for k in KEYS[:50]] == mask[:50].tolist()
    script = "from pipelines.datasets import is_holdout; import sys; print(is_holdout(sys.argv[1:], 0.1).tolist())"
    other = subprocess.run(
        [sys.executable, "-c", script, *KEYS[:200]],
        env={**os.environ, "PYTHONHASHSEED": "12345"},
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert other.stdout.strip() == str(mask[:200].tolist())


@pytest.mark.parametrize("fraction", [0.002, 0.05, 0.2])
def test_holdout_fraction_is_close_to_the_target(fraction):
    """On 10k keys the held-out share is within 4 binomial standard deviations of the fraction."""
    share = is_holdout(KEYS, fraction).mean()
    sd = (fraction * (1 - fraction) / len(KEYS)) ** 0.5
    assert abs(share - fraction) < 4 * sd + 1e-4


def test_holdout_zero_holds_nothing_out():
    """fraction 0 keeps every row for training."""
    assert not is_holdout(KEYS, 0.0).any()


@pytest.fixture
def files(tmp_path):
    """Three parquet files of 700 rows each (key, x), as a committed dataset's shards."""
    paths = []
    for s in range(3):
        keys = [f"{s:05d}{i:04d}" for i in range(700)]
        table = pa.table({"key": keys, "x": np.arange(700, dtype=np.int64) + 1000 * s})
        paths.append(str(tmp_path / f"{s:05d}.parquet"))
        pq.write_table(table, paths[-1])
    return paths


def test_drop_and_load_holdout_partition_the_rows(files):
    """Training rows (drop_holdout) and eval rows (load_holdout) share no key and together are every row, once."""
    fraction = 0.1
    train = pa.concat_tables(drop_holdout(pq.read_table(f), fraction) for f in files)
    held = load_holdout(files, fraction, max_rows=10**9, columns=["key", "x"])
    every = pa.concat_tables(pq.read_table(f) for f in files)
    train_keys, held_keys = train.column("key").to_pylist(), held.column("key").to_pylist()
    assert not set(train_keys) & set(held_keys)
    assert sorted(train_keys + held_keys) == sorted(every.column("key").to_pylist())
    assert 0 < held.num_rows < train.num_rows
    assert train.schema == every.schema and held.column_names == ["key", "x"]
    rows = {k: x for k, x in zip(*every.to_pydict().values(), strict=True)}
    assert all(rows[k] == x for k, x in zip(*held.to_pydict().values(), strict=True))


def test_load_holdout_caps_rows(files):
    """At most max_rows held-out rows, all of them held out; no files gives None."""
    held = load_holdout(files, 0.5, max_rows=5, columns=["key"])
    assert held.num_rows == 5 and is_holdout(held.column("key").to_pylist(), 0.5).all()
    assert load_holdout([], 0.5, max_rows=5, columns=["key"]) is None


def test_load_holdout_rows_do_not_depend_on_the_row_order_in_the_files(tmp_path, files):
    """The same rows written in another order (another ingest's download order) give the same
    capped eval rows, in the same order."""
    shuffled = []
    for i, path in enumerate(files):
        table = pq.read_table(path)
        table = table.take(np.random.default_rng(i).permutation(table.num_rows))
        shuffled.append(str(tmp_path / f"shuffled-{i}.parquet"))
        pq.write_table(table, shuffled[-1])
    for max_rows in (7, 100):
        want = load_holdout(files, 0.1, max_rows=max_rows, columns=["key", "x"])
        assert load_holdout(shuffled, 0.1, max_rows=max_rows, columns=["key", "x"]).equals(want)
