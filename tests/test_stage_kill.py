"""A features run SIGKILLed mid-way and re-run: every key exactly once, no partial file ever read."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines.catalog import Catalog
from tests.process_tree import kill_driver_and_ray
from tests.raw_fixture import make_raw_corpus

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]
REPO = Path(__file__).resolve().parents[1]


def test_killed_run_resumes_with_every_key_exactly_once(tmp_path):
    """Kill the stage after some shards committed; the re-run builds only the rest; keys appear once."""
    root = tmp_path / "d"
    catalog = Catalog(root)
    make_raw_corpus(catalog, "demo", num_shards=8, per_shard=60)
    out = root / "corpora" / "demo" / "features" / "tiny"
    ray_tmp = Path("/tmp") / f"rk{os.getpid()}"  # short: Ray's socket paths have a length limit
    env = os.environ | {"RAY_TMPDIR": str(ray_tmp), "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "pipelines.features", "--root", str(root), "--corpus", "demo",
           "--encoder", "tiny", "--batch-size", "1", "--num-workers", "1"]  # fmt: skip
    proc = subprocess.Popen(
        cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not list(out.glob("*.done.json")):
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.05)
        done_at_kill = len(list(out.glob("*.done.json")))
    finally:
        kill_driver_and_ray(proc, str(ray_tmp))
    assert 1 <= done_at_kill < 8, f"kill landed at {done_at_kill}/8 committed shards"

    # Readers see only committed shards: whatever the kill left half-written is never listed.
    committed = catalog.committed_files(str(out))
    assert all(p.endswith(".parquet") and ".tmp-" not in p for p in committed)
    for path in committed:
        pq.read_table(path)  # every listed file is a complete parquet file

    committed_before = len(catalog.committed(str(out)))
    result = subprocess.run(
        cmd,
        env=env | {"RAY_TMPDIR": str(ray_tmp) + "b"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    built = int(result.stdout.split(" to build")[0].rsplit(" ", 1)[-1])
    assert built == 8 - committed_before  # only the shards the kill left uncommitted are rebuilt
    keys = [
        k
        for p in catalog.committed_files(str(out))
        for k in pq.read_table(p, columns=["key"])["key"].to_pylist()
    ]
    assert len(keys) == 8 * 60 and len(set(keys)) == 8 * 60
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]
