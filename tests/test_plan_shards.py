"""Shard planning (pipelines.catalog.plan_shards): what a stage builds, keeps and reports, without Ray."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from pipelines.catalog import Catalog, DoneRecord, Plan, plan_shards


def record(shard: str, digest: str) -> DoneRecord:
    return DoneRecord(
        shard=shard, stage="features", digest=digest, files=[f"{shard}.parquet"], rows=1
    )


def test_plan_sorts_shards_into_build_up_to_date_stale_and_orphaned():
    """A wanted shard without a record is missing, one with another digest stale, one with the same digest up to date; a record nobody wants is orphaned."""
    wanted = {"00003": "d3", "00000": "d0", "00001": "d1", "00002": "d2"}
    existing = {"00000": record("00000", "d0"), "00001": record("00001", "old"),
                "00009": record("00009", "d9")}  # fmt: skip
    plan = plan_shards(wanted, existing)
    assert plan.missing == ["00002", "00003"]
    assert plan.stale == ["00001"]
    assert plan.up_to_date == ["00000"]
    assert plan.orphaned == ["00009"]
    assert plan.to_build == ["00001", "00002", "00003"]  # missing + stale, in shard order
    assert plan.summary() == "3 to build, 1 up to date, 1 stale, 1 orphaned"


def test_plan_of_nothing_built_and_of_everything_built():
    """With no records every wanted shard is built; with matching records nothing is."""
    wanted = {f"{i:05d}": f"d{i}" for i in range(4)}
    assert plan_shards(wanted, {}).to_build == sorted(wanted)
    done = plan_shards(wanted, {s: record(s, d) for s, d in wanted.items()})
    assert done.to_build == [] and done.up_to_date == sorted(wanted)
    assert done.summary() == "0 to build, 4 up to date, 0 stale, 0 orphaned"
    assert plan_shards({}, {}) == Plan()


def test_unbuildable_inputs_are_reported():
    """Blocked input shards are counted in the summary, apart from the shards to build."""
    plan = plan_shards({"00000": "d0"}, {})
    plan.blocked["00001"] = "corrupt tar"
    assert plan.summary() == "1 to build, 0 up to date, 0 stale, 0 orphaned, 1 unbuildable"


def test_plan_against_committed_records_is_idempotent(tmp_path):
    """After committing the planned shards a rerun has nothing to build; a changed digest makes exactly that shard stale."""
    catalog = Catalog(tmp_path)
    directory = catalog.stage_dir("demo", "features", "tiny")
    catalog.fs.create_dir(directory, recursive=True)
    wanted = {"00000": "d0", "00001": "d1"}
    for shard in plan_shards(wanted, catalog.committed(directory)).to_build:
        Path(directory, f"{shard}.parquet").write_bytes(b"x")  # its data file
        catalog.commit(directory, record(shard, wanted[shard]))
    assert plan_shards(wanted, catalog.committed(directory)).to_build == []
    rerun = plan_shards(wanted | {"00001": "d1-new-config"}, catalog.committed(directory))
    assert rerun.stale == ["00001"] and rerun.up_to_date == ["00000"]


def test_planning_imports_no_ray():
    """pipelines.catalog (planning, commit records) imports without Ray."""
    code = "import sys, pipelines.catalog; sys.exit('ray' in sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)
