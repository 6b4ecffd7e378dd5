"""Ingest into an object-store root (`s3://bucket/prefix` on a moto S3 server on 127.0.0.1) works as a
local root does: committed shards in the bucket, incremental runs, retries, lost shards, dry runs,
and nothing left in the working folder or in the node's scratch. The shard committer is also tested
on its own (no server).

One S3 server per module; each test has its own bucket. The synthetic images are served by an
`ImageServer` on 127.0.0.1 (`allow_private_hosts`). MLflow goes to a sqlite file under the test's
tmp_path (`MLFLOW_TRACKING_URI`): these tests are about ingest, not the tracking store.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines import ingest, rawcommit
from pipelines.catalog import Catalog
from pipelines.synthetic import ImageServer, make_images, write_url_list
from pipelines.urllists import UrlTable
from tests.chain import seedpipe_exe, user_env
from tests.s3_server import S3Server

FAST = {"image_size": 32, "threads": 4, "timeout": 2, "allow_private_hosts": True,
        "samples_per_shard": 3}  # fmt: skip
FAST_ARGS = ["--image-size", "32", "--threads", "4", "--timeout", "2", "--allow-private-hosts",
             "--samples-per-shard", "3"]  # fmt: skip


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """One moto S3 server for the module."""
    server = S3Server(tmp_path_factory.mktemp("s3"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def store(s3, tmp_path, monkeypatch):
    """A fresh bucket, the server's AWS variables, MLflow in a sqlite file, this test's own scratch
    and an empty working folder as the current one. Yields (bucket, workdir, scratch)."""
    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    scratch, workdir = tmp_path / "scratch", tmp_path / "work"
    scratch.mkdir()
    workdir.mkdir()
    monkeypatch.setenv("SEEDPIPE_SCRATCH", str(scratch))
    monkeypatch.chdir(workdir)
    yield s3.create_bucket(f"ingest-{uuid.uuid4().hex[:12]}"), workdir, scratch


def _config(root: str, corpus: str, url_list: Path | str | None, **kw) -> ingest.IngestConfig:
    url_list = None if url_list is None else str(url_list)
    return ingest.IngestConfig(root=root, corpus=corpus, url_list=url_list, **FAST | kw)


def _listing(s3: S3Server, bucket: str, prefix: str) -> dict[str, tuple[str, object]]:
    """{key: (etag, last modified)} of every object under `prefix`."""
    pages = s3.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {o["Key"]: (o["ETag"], o["LastModified"]) for p in pages for o in p.get("Contents", [])}


def _objects(s3: S3Server, bucket: str, prefix: str) -> set[str]:
    """Object keys under `prefix`, without pyarrow's folder markers (`.../`)."""
    return {k for k in s3.keys(bucket, prefix) if not k.endswith("/")}


def _shard_keys(raw_key: str, *shards: str) -> set[str]:
    return {f"{raw_key}/{s}{suffix}" for s in shards
            for suffix in (".tar", ".parquet", ".done.json", "_stats.json")}  # fmt: skip


def _committed_uids(catalog: Catalog, raw: str) -> dict[str, list[str]]:
    """{shard: uids of its successful rows}, read from the store; each tar holds exactly the
    images its parquet lists as successes."""
    out = {}
    for sid in catalog.committed(raw):
        rows = pq.read_table(f"{raw}/{sid}.parquet", filesystem=catalog.fs).to_pylist()
        ok = [r for r in rows if r["status"] == "success"]
        with (
            catalog.fs.open_input_stream(f"{raw}/{sid}.tar") as f,
            tarfile.open(fileobj=io.BytesIO(f.read())) as tf,
        ):
            names = tf.getnames()
        assert {n.split(".")[0] for n in names if n.endswith(".jpg")} == {r["key"] for r in ok}
        out[sid] = sorted(r["uid"] for r in ok)
    return out


def _uids(rows: list[tuple[str, str]]) -> list[str]:
    return sorted(ingest.row_uid(url, caption) for url, caption in rows)


def _no_staging_left(scratch: Path) -> bool:
    """The runs' staging folders under `<scratch>/ingest` are gone."""
    return not (scratch / "ingest").exists() or not any((scratch / "ingest").iterdir())


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_bucket_root_commits_noop_extend_and_lost_shard(s3, store, tmp_path):
    """`main([...])` with an s3:// root commits the list's shards in the bucket (tar, parquet,
    stats, record, manifest), a rerun is a no-op that writes nothing, an appended list adds only
    new shards, and a record corrupted in the bucket makes its shard lost and re-downloaded; the
    working folder and the scratch staging stay empty."""
    bucket, workdir, scratch = store
    root, raw_key = f"s3://{bucket}/seed-data", "seed-data/corpora/web/raw"
    images = make_images(10, seed=31)
    with ImageServer(images) as srv:
        rows = [(srv.image_url(n), c) for n, _, c in images]
        list_a = write_url_list(tmp_path / "a.tsv", rows[:7], "tsv")
        list_b = write_url_list(tmp_path / "b.tsv", rows, "tsv")  # list a + 3 rows
        args = ["--root", root, "--corpus", "web", *FAST_ARGS, "--url-list", str(list_a)]
        assert ingest.main(args) == 0

        keys = _objects(s3, bucket, raw_key)
        sources = {k for k in keys if k.startswith(f"{raw_key}/_sources/")}
        assert len(sources) == 1
        shards = _shard_keys(raw_key, "00000", "00001", "00002")
        assert keys == shards | sources | {f"{raw_key}/manifest.json"}
        catalog = Catalog(root)
        raw = catalog.raw_dir("web")
        first = _committed_uids(catalog, raw)
        assert [len(u) for u in first.values()] == [3, 3, 1]
        assert sorted(u for us in first.values() for u in us) == _uids(rows[:7])
        manifest = json.loads(catalog.read_text(f"{raw}/manifest.json"))
        assert sorted(manifest["shards"]) == ["00000", "00001", "00002"]

        before = _listing(s3, bucket, "seed-data/corpora")
        again = ingest.run(_config(root, "web", list_a))
        assert again.status == "no-op" and "already ingested" in again.message
        assert _listing(s3, bucket, "seed-data/corpora") == before

        extend = ingest.run(_config(root, "web", list_b))
        assert extend.new_shards == ["00003"] and extend.planning == {"already_ingested": 7}
        after = _listing(s3, bucket, raw_key)
        assert {k: after[k] for k in shards} == {k: before[k] for k in shards}

        # a completion record in a bucket is as untrusted as one on disk
        record_key = f"{raw_key}/00001.done.json"
        body = s3.client().get_object(Bucket=bucket, Key=record_key)["Body"].read()
        s3.client().put_object(Bucket=bucket, Key=record_key, Body=body[:40])
        rerun = ingest.run(_config(root, "web", list_a))  # the lost shard's list
        assert list(rerun.lost_shards) == ["00001"] and "sound" in rerun.lost_shards["00001"]
        assert rerun.new_shards == ["00004"] and rerun.rows_to_download == 3
        assert rerun.exit_code == 0
        assert ingest.run(_config(root, "web", list_a)).status == "no-op"
    final = _committed_uids(catalog, raw)
    assert sorted(final) == ["00000", "00002", "00003", "00004"]
    assert final["00004"] == first["00001"]
    assert sorted(u for us in final.values() for u in us) == _uids(rows)  # each image once
    failed = {k.rsplit("/", 1)[-1] for k in _objects(s3, bucket, f"{raw_key}/_failed/")}
    assert {"00001.tar", "00001.parquet", "00001.done.json"} <= failed
    assert list(workdir.iterdir()) == []
    assert _no_staging_left(scratch)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bucket_root_failed_shard_dry_run_and_retry(s3, store, tmp_path, monkeypatch, capsys):
    """On an s3:// root a shard that fails its checks goes to `_failed/` in the bucket, uncommitted;
    `--retry-failed --dry-run` writes nothing; `--retry-failed` re-attempts only that shard and the
    transient failures (never the 404) into new shards, and then has nothing left to retry."""
    bucket, workdir, scratch = store
    root, raw_key = f"s3://{bucket}/seed-data", "seed-data/corpora/rt/raw"
    images = make_images(7, seed=32)
    real_inspect = rawcommit.inspect_shard

    def corrupt_shard_1(directory, shard):
        if shard == "00001":
            Path(directory, f"{shard}.tar").write_bytes(b"\x00garbage" * 100)
        return real_inspect(directory, shard)

    with ImageServer(images, flaky_failures=1) as srv:
        img = [(srv.image_url(n), c) for n, _, c in images[:5]]
        flaky = [(srv.url(f"/flaky/{n}"), f"flaky {n}") for n, _, _ in images[5:]]
        rows = [img[0], flaky[0], img[1], *img[2:5], flaky[1], (srv.url("/404"), "gone")]
        url_list = write_url_list(tmp_path / "list.tsv", rows, "tsv")
        args = ["--root", root, "--corpus", "rt", *FAST_ARGS]
        monkeypatch.setattr(rawcommit, "inspect_shard", corrupt_shard_1)
        assert ingest.main([*args, "--url-list", str(url_list)]) == 1
        assert "FAILED shard 00001" in capsys.readouterr().out
        monkeypatch.setattr(rawcommit, "inspect_shard", real_inspect)

        catalog = Catalog(root)
        raw = catalog.raw_dir("rt")
        assert sorted(catalog.committed(raw)) == ["00000", "00002"]
        failed = {k.rsplit("/", 1)[-1] for k in _objects(s3, bucket, f"{raw_key}/_failed/")}
        assert failed == {"00001.tar", "00001.parquet", "00001_stats.json"}
        assert f"{raw_key}/00001.tar" not in _objects(s3, bucket, raw_key)

        before = _listing(s3, bucket, "seed-data/corpora")
        assert ingest.main([*args, "--retry-failed", "--dry-run"]) == 0
        assert "to download          5 in 2 shards" in capsys.readouterr().out
        assert _listing(s3, bucket, "seed-data/corpora") == before

        requests_before = dict(srv.requests)
        assert ingest.main([*args, "--retry-failed"]) == 0
        delta = {p: n - requests_before.get(p, 0) for p, n in srv.requests.items()
                 if n != requests_before.get(p, 0)}  # fmt: skip
        assert "/404" not in delta and sum(delta.values()) == 5  # shard 00001's 3 + 2 flaky
        capsys.readouterr()
        assert ingest.main([*args, "--retry-failed"]) == 0
        assert "nothing left to retry" in capsys.readouterr().out
    records = catalog.committed(raw)
    assert sorted(records) == ["00000", "00002", "00003", "00004"]
    uids = _committed_uids(catalog, raw)
    assert sorted(u for us in uids.values() for u in us) == _uids(rows[:-1])  # each image once
    assert list(workdir.iterdir()) == []
    assert _no_staging_left(scratch)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_console_script_ingests_a_list_in_the_bucket(s3, store, tmp_path):
    """The installed `seedpipe ingest`, run from an empty folder with a URL list and a root that are
    both s3:// URIs, commits the list into the bucket and then is a no-op; it writes nothing in the
    working folder and leaves no staging behind."""
    bucket, workdir, scratch = store
    images = make_images(5, seed=33)
    env = user_env() | {
        k: v for k, v in os.environ.items() if k.startswith(("AWS_", "MLFLOW_", "SEEDPIPE_"))
    }
    with ImageServer(images) as srv:
        rows = [(srv.image_url(n), c) for n, _, c in images]
        local_list = write_url_list(tmp_path / "urls.tsv", rows, "tsv")
        s3.client().put_object(Bucket=bucket, Key="lists/urls.tsv", Body=local_list.read_bytes())
        list_uri = f"s3://{bucket}/lists/urls.tsv"
        argv = [seedpipe_exe(), "ingest", "--root", f"s3://{bucket}/seed-data", "--corpus", "cli",
                "--url-list", list_uri, *FAST_ARGS]  # fmt: skip
        runs = [subprocess.run(argv, cwd=workdir, env=env, capture_output=True, text=True,
                               timeout=240) for _ in range(2)]  # fmt: skip
    for proc in runs:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "already ingested" in runs[1].stdout
    raw_key = "seed-data/corpora/cli/raw"
    assert _shard_keys(raw_key, "00000", "00001") | {f"{raw_key}/manifest.json"} <= _objects(
        s3, bucket, raw_key
    )
    catalog = Catalog(f"s3://{bucket}/seed-data")
    raw = catalog.raw_dir("cli")
    uids = _committed_uids(catalog, raw)
    assert sorted(u for us in uids.values() for u in us) == _uids(rows)
    manifest = json.loads(catalog.read_text(f"{raw}/manifest.json"))
    assert [s["uri"] for s in manifest["sources"].values()] == [list_uri]
    assert list(workdir.iterdir()) == []
    assert _no_staging_left(scratch)


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_interrupted_ingest_keeps_committed_shards_and_no_staging(s3, store, tmp_path):
    """`seedpipe ingest` on an s3:// root interrupted (SIGINT) while its second shard downloads
    keeps the first shard, committed as soon as it was finished, and deletes its staging; the
    next run of the list downloads only the second shard's rows."""
    import signal
    import time

    bucket, workdir, scratch = store
    root, raw_key = f"s3://{bucket}/seed-data", "seed-data/corpora/kill/raw"
    images = make_images(5, seed=34)
    env = user_env() | {
        k: v for k, v in os.environ.items() if k.startswith(("AWS_", "MLFLOW_", "SEEDPIPE_"))
    }
    with ImageServer(images, stall_s=120) as srv:
        rows = [(srv.image_url(n), c) for n, _, c in images] + [(srv.url("/stall"), "slow")]
        url_list = write_url_list(tmp_path / "urls.tsv", rows, "tsv")
        argv = [seedpipe_exe(), "ingest", "--root", root, "--corpus", "kill", "--url-list",
                str(url_list), *FAST_ARGS, "--timeout", "100", "--deadline", "110"]  # fmt: skip
        proc = subprocess.Popen(argv, cwd=workdir, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
        try:
            deadline = time.monotonic() + 180
            while f"{raw_key}/00000.done.json" not in s3.keys(bucket, raw_key):
                assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
                time.sleep(0.2)
            proc.send_signal(signal.SIGINT)  # shard 00001 waits on /stall
            out, _ = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)
        assert proc.returncode != 0, out[-3000:]
        catalog = Catalog(root)
        raw = catalog.raw_dir("kill")
        assert sorted(catalog.committed(raw)) == ["00000"]
        assert _no_staging_left(scratch) and list(workdir.iterdir()) == []

        rerun = ingest.run(_config(root, "kill", url_list, timeout=1, deadline=2))
        assert rerun.planning == {"already_ingested": 3} and rerun.rows_to_download == 3
        assert rerun.new_shards == ["00001"] and rerun.failures == {"timeout": 1}
    uids = _committed_uids(catalog, raw)
    assert sorted(u for us in uids.values() for u in us) == _uids(rows[:-1])  # each image once


def _stage_shard(staged: Path, sid: str, table: UrlTable, *, stats: str | None) -> None:
    """Write what img2dataset leaves for a shard of `table`'s rows: tar, parquet, stats file."""
    import hashlib

    import pyarrow as pa

    staged.mkdir(parents=True, exist_ok=True)
    keys = [f"{sid}{i:04d}" for i in range(len(table))]
    with tarfile.open(staged / f"{sid}.tar", "w") as tf:
        for key in keys:
            info = tarfile.TarInfo(f"{key}.jpg")
            info.size = 3
            tf.addfile(info, io.BytesIO(b"jpg"))
    pq.write_table(pa.table({
        "key": keys, "uid": table.uid, "status": ["success"] * len(keys),
        "error_message": [None] * len(keys), "sha256": [hashlib.sha256(b"jpg").hexdigest()] * len(keys),
    }), staged / f"{sid}.parquet")  # fmt: skip
    if stats is not None:
        (staged / f"{sid}_stats.json").write_text(stats)


def test_committer_commits_each_shard_once_img2dataset_has_finished_it(tmp_path, monkeypatch):
    """While the download runs, a staged shard is committed as soon as its stats file is complete
    (its staged tar and parquet are then gone, the stats file stays for img2dataset's logger); a
    half-written stats file waits; after the download, a shard without one fails into `_failed/`;
    an error while committing is raised when the download ends."""
    import time

    catalog = Catalog(tmp_path / "root")
    raw, staged = catalog.raw_dir("unit"), tmp_path / "staged"
    table = UrlTable()
    for i in range(6):
        table.add(f"http://example.org/{i}.jpg", f"caption {i}")
    result = ingest.IngestResult(corpus="unit", raw_dir=raw, status="", message="")
    committer = rawcommit.ShardCommitter(catalog, raw, staged, table, result, 7, 2)
    done = '{"start_time": 1.0, "end_time": 2.0}'
    with committer.watching(every_s=0.02):
        _stage_shard(staged, "00008", table.subset([i in (2, 3) for i in range(6)]), stats=done)
        _stage_shard(staged, "00007", table.subset([i < 2 for i in range(6)]), stats=done[:10])
        deadline = time.monotonic() + 20
        while "00008" not in catalog.committed(raw) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sorted(catalog.committed(raw)) == ["00008"]  # 00007's stats is still being written
        assert sorted(p.name for p in staged.iterdir() if p.name.startswith("00008")) == [
            "00008_stats.json"
        ]
    committer.finish()
    assert result.new_shards == ["00008"] and result.successes == 2
    assert list(result.failed_shards) == ["00007", "00009"]
    assert committer.failures == {"shard_failed": 4}
    assert sorted(Path(raw, "_failed").iterdir()) == [
        Path(raw, "_failed", n) for n in ("00007.parquet", "00007.tar", "00007_stats.json")
    ]
    record = catalog.read_record(raw, "00008")
    assert record.file_sizes["00008.tar"] == Path(raw, "00008.tar").stat().st_size

    def store_down(*args, **kwargs):
        raise OSError("store unreachable")

    monkeypatch.setattr(rawcommit, "put_staged", store_down)
    failing = rawcommit.ShardCommitter(catalog, raw, staged, table, result, 10, 6)
    with pytest.raises(OSError, match="store unreachable"), failing.watching(every_s=0.02):
        _stage_shard(staged, "00010", table, stats=done)
        deadline = time.monotonic() + 20
        while failing.error is None and time.monotonic() < deadline:
            time.sleep(0.02)
    assert "00010" not in catalog.committed(raw)
