"""A tampered catalog (issue 9, section 4): the catalog trusts nothing it did not just write.

Completion records naming paths outside their folder or another shard's files, truncated or
unknown-key records, and data files deleted, resized or replaced under their record are each
reported and never read or deleted as if sound; every sound shard stays as it was.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from pipelines.catalog import Catalog, DoneRecord, RecordError, digest_of
from pipelines.stage import plan_stage
from tests.raw_fixture import jpeg, make_raw_corpus

CORPUS = "demo"


def _catalog_with_features(tmp_path) -> tuple[Catalog, str, str, Path]:
    """3 raw shards and their (fake) features shards, all committed; a victim file outside."""
    catalog = Catalog(tmp_path / "root")
    make_raw_corpus(catalog, CORPUS, num_shards=3, per_shard=2)
    raw, out = catalog.raw_dir(CORPUS), catalog.stage_dir(CORPUS, "features", "f")
    _, tasks = _plan(catalog, raw, out)
    catalog.fs.create_dir(out, recursive=True)
    for task in tasks:
        Path(out, f"{task.shard}.parquet").write_bytes(f"features of {task.shard}".encode())
        record = DoneRecord(shard=task.shard, stage="features", digest=_digest(task),
                            files=[f"{task.shard}.parquet"], rows=2, input_digest=task.input_digest)  # fmt: skip
        catalog.commit(out, record)
    victim = tmp_path / "victim.txt"
    victim.write_text("not the catalog's")
    return catalog, raw, out, victim


def _plan(catalog, raw, out):
    return plan_stage(catalog, input_dir=raw, output_dir=out,
                      config_digest=digest_of({"c": 1}), model_digest="m")  # fmt: skip


def _digest(task) -> str:
    from pipelines.catalog import derived_shard_digest

    return derived_shard_digest(task.input_digest, task.config_digest, task.model_digest)


def _edit_record(path: Path, **changes) -> None:
    record = json.loads(path.read_text())
    record.update(changes)
    path.write_text(json.dumps(record))


def path_traversal(raw, out, victim):
    """A record listing ../../../victim.txt (uncommitting it deleted the victim)."""
    rel = "../" * (len(Path(out).relative_to(victim.parent).parts)) + victim.name
    _edit_record(Path(out, "00001.done.json"), files=[rel], digest="stale")
    return {"damaged": ["00001"], "to_build": ["00001"]}


def other_shards_file(raw, out, victim):
    """Shard 00001's record claims 00002's data file (uncommitting 00001 deleted it)."""
    _edit_record(Path(out, "00001.done.json"), files=["00002.parquet"], digest="stale")
    return {"damaged": ["00001"], "to_build": ["00001"]}


def bad_shard_id(raw, out, victim):
    """A record whose shard is not an id ("../x")."""
    _edit_record(Path(out, "00001.done.json"), shard="../x")
    return {"damaged": ["00001"], "to_build": ["00001"]}


def truncated_record(raw, out, victim):
    """A done.json cut in half (it crashed every stage listing the folder)."""
    p = Path(out, "00001.done.json")
    p.write_text(p.read_text()[:40])
    return {"damaged": ["00001"], "to_build": ["00001"]}


def unknown_key(raw, out, victim):
    """A done.json with a key DoneRecord does not know (a TypeError in every stage before)."""
    _edit_record(Path(out, "00001.done.json"), surprise=1)
    return {"damaged": ["00001"], "to_build": ["00001"]}


def deleted_output(raw, out, victim):
    """A deleted features parquet still planned as "up to date"."""
    Path(out, "00001.parquet").unlink()
    return {"damaged": ["00001"], "to_build": ["00001"]}


def resized_output(raw, out, victim):
    """A features parquet overwritten with other bytes."""
    Path(out, "00001.parquet").write_bytes(b"something else entirely")
    return {"damaged": ["00001"], "to_build": ["00001"]}


def deleted_input(raw, out, victim):
    """A deleted raw tar (its features would be rebuilt from nothing, or kept as up to date)."""
    Path(raw, "00001.tar").unlink()
    return {"blocked": ["00001"], "to_build": []}


def cut_input(raw, out, victim):
    """A raw tar cut at a member boundary (read as fewer rows, no failure counted)."""
    p = Path(raw, "00001.tar")
    p.write_bytes(p.read_bytes()[:1536])
    return {"blocked": ["00001"], "to_build": []}


CASES = [path_traversal, other_shards_file, bad_shard_id, truncated_record, unknown_key,
         deleted_output, resized_output, deleted_input, cut_input]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_tampered_shard_is_reported_and_nothing_else_touched(tmp_path, case):
    """Planning reports the tampered shard (rebuilt if an output, unbuildable if an input),
    rebuilding it deletes nothing outside its own files, and every other shard stays up to date."""
    catalog, raw, out, victim = _catalog_with_features(tmp_path)
    others = sorted(
        set(catalog.list_files(out)) - {f"{out}/00001.parquet", f"{out}/00001.done.json"}
    )
    expected = case(raw, out, victim)
    plan, tasks = _plan(catalog, raw, out)
    assert sorted(plan.damaged) == expected.get("damaged", [])
    assert sorted(plan.blocked) == expected.get("blocked", [])
    assert plan.to_build == expected["to_build"] == [t.shard for t in tasks]
    assert plan.up_to_date == ["00000", "00002"] and plan.orphaned == []
    assert all("00001" in line for line in plan.problems()) and len(plan.problems()) == 1
    for sid in plan.stale:  # what the stage runner does before rebuilding
        catalog.uncommit(out, sid)
    catalog.sweep_uncommitted(out, shards=plan.to_build)
    assert victim.read_text() == "not the catalog's"
    assert set(others) <= set(catalog.list_files(out))  # the other shards' files and records
    # a damaged output is gone until rebuilt; the output of a damaged input stays as it was
    assert sorted(catalog.committed(out)) == (
        ["00000", "00002"] if plan.damaged else ["00000", "00001", "00002"]
    )


def test_records_refuse_unsafe_names():
    """A DoneRecord cannot name a shard that is not an id, or a file that is not its own."""
    with pytest.raises(RecordError, match="not a shard id"):
        DoneRecord(shard="../00001", stage="raw", digest="d", files=[], rows=0)
    for name in ("../../victim.txt", "/etc/passwd", "00002.tar", "00001.tar/../../x", ".00001"):
        with pytest.raises(RecordError, match="not a file of this shard"):
            DoneRecord(shard="00001", stage="raw", digest="d", files=[name], rows=0)
    with pytest.raises(RecordError, match="unreadable"):
        DoneRecord.from_json('{"shard": "00001", "stage": "raw"')


def _same_size_tar(path: Path) -> None:
    """Rewrite a raw tar with its images replaced by other images of exactly the same size."""
    members = []
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            data = tf.extractfile(m).read()
            if m.name.endswith(".jpg"):
                other = jpeg((1, 2, 3))
                data = (other + b"\0" * len(data))[: len(data)]
            members.append((m, data))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for m, data in members:
            tf.addfile(m, io.BytesIO(data))
    assert len(buf.getvalue()) == path.stat().st_size
    path.write_bytes(buf.getvalue())


def _cut_tar_without_hashes(path: Path, record_path: Path) -> None:
    """An old-style record (no sizes, no hashes) over a tar cut after its first sample."""
    with tarfile.open(path) as tf:
        first = [
            m
            for m in tf.getmembers()
            if m.name.split(".")[0] == tf.getmembers()[0].name.split(".")[0]
        ]
        end = max(m.offset_data + ((m.size + 511) // 512) * 512 for m in first)
    path.write_bytes(path.read_bytes()[:end])
    _edit_record(record_path, file_sizes={}, file_sha256={})


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("tamper", ["same_size_images", "cut_tar_old_record"])
def test_features_reads_only_the_bytes_its_record_names(tmp_path, ray_session, mlflow_env, tamper):
    """Raw tar images replaced under an unchanged record (same size) fail that features shard
    (sha256 checked while reading) instead of being featurized under the old digest; a cut tar
    under a record without hashes counts its missing rows as missing_in_tar. The other shard is
    built either way."""
    from pipelines import features

    root = tmp_path / "root"
    catalog = Catalog(root)
    make_raw_corpus(catalog, CORPUS, num_shards=2, per_shard=3)
    raw = Path(catalog.raw_dir(CORPUS))
    if tamper == "same_size_images":
        _same_size_tar(raw / "00001.tar")
    else:
        _cut_tar_without_hashes(raw / "00001.tar", raw / "00001.done.json")
    code = features.main(["--root", str(root), "--corpus", CORPUS, "--encoder", "tiny"])
    committed = catalog.committed(catalog.stage_dir(CORPUS, "features", "tiny"))
    if tamper == "same_size_images":
        assert code == 1 and sorted(committed) == ["00000"]
    else:
        assert code == 0 and sorted(committed) == ["00000", "00001"]
        assert committed["00001"].failures == {"missing_in_tar": 2}
        assert committed["00001"].rows == 1


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ingest_rebuilds_only_lost_raw_shards(tmp_path, monkeypatch):
    """A corrupt raw parquet and a truncated raw done.json no longer block the corpus: the next
    run of the same list reports both shards lost, sets them aside and downloads just their rows
    again; the sound shard is untouched, every image is in the corpus exactly once, and a new
    list and a rerun behave as usual."""
    from pipelines import ingest
    from pipelines.synthetic import ImageServer, make_images, write_url_list

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    images = make_images(10, seed=21)
    root = tmp_path / "root"
    fast = dict(root=str(root), corpus="lost", samples_per_shard=3, allow_private_hosts=True,
                image_size=32, threads=4, timeout=2)  # fmt: skip
    with ImageServer(images) as srv:
        rows = [(srv.image_url(n), c) for n, _, c in images]
        list_a = write_url_list(tmp_path / "a.tsv", rows[:9], "tsv")
        first = ingest.run(ingest.IngestConfig(url_list=str(list_a), **fast))
        assert first.new_shards == ["00000", "00001", "00002"] and first.successes == 9

        raw = Path(Catalog(root).raw_dir("lost"))
        sound = (raw / "00002.tar").read_bytes()
        size = (raw / "00000.parquet").stat().st_size
        (raw / "00000.parquet").write_bytes(b"\0" * size)  # same size: only reading tells
        p = raw / "00001.done.json"
        p.write_text(p.read_text()[:30])
        again = ingest.run(ingest.IngestConfig(url_list=str(list_a), **fast))
        assert sorted(again.lost_shards) == ["00000", "00001"]
        assert "unreadable" in again.lost_shards["00000"] and "sound" in again.lost_shards["00001"]
        assert again.rows_to_download == 6 and again.successes == 6 and again.exit_code == 0
        assert again.new_shards == ["00003", "00004"]
        assert (raw / "00002.tar").read_bytes() == sound
        assert (raw / "_failed" / "00000.parquet").exists()

        list_b = write_url_list(tmp_path / "b.tsv", rows[9:], "tsv")
        third = ingest.run(ingest.IngestConfig(url_list=str(list_b), **fast))
        assert third.new_shards == ["00005"] and third.successes == 1
        rerun = ingest.run(ingest.IngestConfig(url_list=str(list_a), **fast))
        assert rerun.status == "no-op"
    catalog = Catalog(root)
    records = catalog.committed(str(raw))
    assert sorted(records) == ["00002", "00003", "00004", "00005"]
    import pyarrow.parquet as pq

    uids = [
        r["uid"]
        for sid in records
        for r in pq.read_table(raw / f"{sid}.parquet").to_pylist()
        if r["status"] == "success"
    ]
    assert sorted(uids) == sorted(ingest.row_uid(u, c) for u, c in rows)
