"""Ingest: URL lists -> img2dataset shards, per-cause failures, address filter, incremental runs.

Every HTTP request goes to an `ImageServer` on 127.0.0.1 started and stopped by the test; address
decisions about other hosts are made with a fake resolver and never connect.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import tarfile
import urllib.error
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import ingest, rawcommit
from pipelines.catalog import Catalog, dataset_digest
from pipelines.synthetic import ImageServer, make_images, write_url_list

FAST = {"image_size": 32, "threads": 4, "timeout": 2, "processes": 1}


def _config(root, corpus, url_list, **kwargs) -> ingest.IngestConfig:
    """An IngestConfig with the fast test settings (FAST) under `kwargs`."""
    url_list = None if url_list is None else str(url_list)
    return ingest.IngestConfig(root=str(root), corpus=corpus, url_list=url_list, **FAST | kwargs)


def runs_img2dataset(test):
    """Mark a test that downloads with img2dataset (spawned workers): slow, bounded in time."""
    return pytest.mark.slow(pytest.mark.timeout(180)(test))


@pytest.fixture(autouse=True)
def _mlflow_under_root(monkeypatch, tmp_path):
    """Each test's runs go to the sqlite store under its root; stray ./mlruns land in tmp_path."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    yield
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # mlflow.set_tracking_uri exports it


def _files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def _shard_rows(raw: str, shard: str) -> list[dict]:
    return pq.read_table(f"{raw}/{shard}.parquet").to_pylist()


@runs_img2dataset
def test_happy_path_three_shards_records_manifest_mlflow(tmp_path):
    """12 images at 5 per shard give 3 committed shards whose records, digests, uids, manifest and
    MLflow datasets all agree with what the server sent."""
    images = make_images(12, seed=1)
    by_caption = {caption: data for _, data, caption in images}
    with ImageServer(images) as srv:
        rows = [{"url": srv.image_url(name), "caption": cap} for name, _, cap in images]
        url_list = write_url_list(tmp_path / "list.parquet", rows, "parquet")
        result = ingest.run(
            _config(
                tmp_path / "root", "synth", url_list, samples_per_shard=5, allow_private_hosts=True
            )
        )
    assert result.exit_code == 0 and result.status == "ingested"
    assert result.new_shards == ["00000", "00001", "00002"]
    assert result.successes == 12 and result.failures == {}

    catalog = Catalog(tmp_path / "root")
    raw = catalog.raw_dir("synth")
    records = catalog.committed(raw)
    assert {s: r.rows for s, r in records.items()} == {"00000": 5, "00001": 5, "00002": 2}
    uids = set()
    for sid, record in records.items():
        assert record.files == [f"{sid}.tar", f"{sid}.parquet"] and record.stage == "raw"
        assert record.extra["source"] == hashlib.sha256(url_list.read_bytes()).hexdigest()
        rows_ = _shard_rows(raw, sid)
        for r in rows_:  # the sha256 is of the bytes the server sent; uid links to the list row
            assert r["sha256"] == hashlib.sha256(by_caption[r["caption"]]).hexdigest()
            assert r["uid"] == ingest.row_uid(r["url"], r["caption"])
            uids.add(r["uid"])
        assert record.digest == ingest.raw_shard_digest((r["key"], r["sha256"]) for r in rows_)
        with tarfile.open(f"{raw}/{sid}.tar") as tf:
            assert {n.split(".")[0] for n in tf.getnames()} == {r["key"] for r in rows_}
    assert len(uids) == 12

    manifest = json.loads(Path(raw, "manifest.json").read_text())
    assert {
        s: (m["samples"], m["successes"], m["digest"]) for s, m in manifest["shards"].items()
    } == {s: (r.extra["samples"], r.rows, r.digest) for s, r in records.items()}
    assert manifest["sources"][result.source_digest]["shards"] == ["00000", "00001", "00002"]
    corpus_digest = dataset_digest({s: r.digest for s, r in records.items()})
    assert manifest["dataset_digest"] == corpus_digest

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{catalog.base}/mlflow.db")
    run = client.get_run(result.run_id)
    inputs = {
        next(t.value for t in d.tags if t.key == "mlflow.data.context"): d.dataset
        for d in run.inputs.dataset_inputs
    }
    assert inputs["input"].digest == result.source_digest[:36]
    assert inputs["input"].source and "list.parquet" in inputs["input"].source
    assert inputs["output"].digest == corpus_digest[:36]
    assert run.data.tags["output.synth/raw"] == corpus_digest
    assert run.data.tags["stage"] == "ingest"
    assert run.data.metrics["successes"] == 12 and run.data.metrics["images_per_s"] > 0


@runs_img2dataset
def test_bad_inputs_counted_per_cause_valid_images_kept(tmp_path):
    """Each bad input is counted under its own cause, in the result and in the completion records,
    and every valid image is kept (a redirect to an image included)."""
    images = make_images(6, seed=2)
    with ImageServer(images, stall_s=4) as srv:
        good = [(srv.image_url(n), c) for n, _, c in images[:4]]
        good += [(srv.url("/redirect/00004.jpg"), images[4][2])]
        good += [(srv.image_url(images[5][0]), ""), (srv.image_url("00000.jpg"), "x" * 5000)]
        bad = ["/404", "/403", "/500", "/stall", "/not-image", "/truncated.jpg", "/bomb.png"]
        lines = ["url\tcaption"]
        for i in range(len(good)):  # interleaved: no shard is all bad
            lines.append(f"{good[i][0]}\t{good[i][1]}")
            if i < len(bad):
                lines.append(f"{srv.url(bad[i])}\tbad {bad[i]}")
        lines += [
            f"{good[0][0]}\t{good[0][1]}",  # duplicate row
            "ftp://example.org/a.jpg\tnot http",
            "\tno url",
            "http://[::1/broken\tunparsable",
            f"{srv.image_url('00001.jpg')}\ttoo\tmany columns",
            "only one column",
        ]
        url_list = tmp_path / "list.tsv"
        url_list.write_text("\n".join(lines) + "\n")
        result = ingest.run(
            _config(
                tmp_path / "root", "bad", url_list, samples_per_shard=5, allow_private_hosts=True
            )
        )
        assert srv.requests["/img/00004.jpg"] == 1  # the redirect was followed
    assert result.planning == {
        "malformed_row": 5, "duplicate_row": 1, "empty_caption": 1, "caption_truncated": 1,
    }  # fmt: skip
    expected = {
        "http_404": 1, "http_4xx": 1, "http_5xx": 1, "timeout": 1, "not_an_image": 1,
        "truncated_image": 1, "decompression_bomb": 1,
    }  # fmt: skip
    assert result.failures == expected
    assert result.successes == len(good) == 7 and result.exit_code == 0

    catalog = Catalog(tmp_path / "root")
    raw = catalog.raw_dir("bad")
    records = catalog.committed(raw).values()
    summed: dict[str, int] = {}
    notes: dict[str, int] = {}
    for r in records:
        for cause, n in r.failures.items():
            summed[cause] = summed.get(cause, 0) + n
        for cause, n in r.extra["caption_notes"].items():
            notes[cause] = notes.get(cause, 0) + n
    assert summed == expected
    assert notes == {"empty_caption": 1, "caption_truncated": 1}
    ok = [
        row
        for sid in catalog.committed(raw)
        for row in _shard_rows(raw, sid)
        if row["status"] == "success"
    ]
    assert {row["uid"] for row in ok} == {
        ingest.row_uid(u, c[: ingest.CAPTION_MAX_CHARS]) for u, c in good
    }
    assert max(len(row["caption"]) for row in ok) == ingest.CAPTION_MAX_CHARS


def test_private_hosts_refused_and_server_sees_no_request(tmp_path):
    """Without allow_private_hosts every URL to the loopback server is refused before download:
    counted blocked_address, nothing written, and the server saw no request at all."""
    images = make_images(3, seed=3)
    with ImageServer(images) as srv:
        rows = [(srv.image_url(n), c) for n, _, c in images]
        url_list = write_url_list(tmp_path / "list.csv", rows, "csv")
        result = ingest.run(_config(tmp_path / "root", "c", url_list))
        assert srv.total_requests == 0
    assert result.planning == {"blocked_address": 3}
    assert result.exit_code == 1 and result.status == "nothing-downloadable"
    assert list(result.blocked_reasons) == ["loopback address 127.0.0.1"]
    assert not Catalog(tmp_path / "root").committed(Catalog(tmp_path / "root").raw_dir("c"))


class FakeResolver:
    """getaddrinfo look-alike from a dict; records the names it was asked about."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table, self.asked = table, []

    def __call__(self, host, port, *args, **kwargs):
        self.asked.append(host)
        if host not in self.table:
            raise socket.gaierror(f"fake resolver: unknown host {host}")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in self.table[host]]


@pytest.mark.parametrize(
    ("url", "refused"),
    [
        ("http://10.1.2.3/a.jpg", "private"),
        ("http://172.16.0.1/a.jpg", "private"),
        ("http://192.168.1.20:8080/a.jpg", "private"),
        ("http://169.254.169.254/latest/meta-data/", "metadata"),
        ("http://[::1]/a.jpg", "loopback"),
        ("http://[fd00:ec2::254]/latest/", "metadata"),
        ("http://127.0.0.1:9/a.jpg", "loopback"),
        ("http://0.0.0.0/a.jpg", "unspecified"),
        ("http://[::ffff:10.0.0.1]/a.jpg", "private"),
        ("http://224.0.0.1/a.jpg", "multicast"),
        ("http://metadata.google.internal/computeMetadata/v1/", "metadata"),
        ("http://intranet.example/a.jpg", "resolves to private"),
        ("http://mixed.example/a.jpg", "resolves to loopback"),
        ("http://93.184.216.34/a.jpg", None),
        ("https://[2606:2800:220:1:248:1893:25c8:1946]/a.jpg", None),
        ("https://images.example/a.jpg", None),
        ("https://unknown.example/a.jpg", None),
    ],
)
def test_check_url_decisions(url, refused):
    """check_url refuses private, loopback, link-local, metadata and mapped addresses (literal or
    resolved) and accepts public ones, deciding with a fake resolver and no connection."""
    resolver = FakeResolver(
        {
            "intranet.example": ["10.0.0.7"],
            "mixed.example": ["93.184.216.34", "127.0.0.1"],
            "images.example": ["93.184.216.34"],
        }
    )
    cause = ingest.check_url(url, resolver)
    if refused is None:
        assert cause is None
    else:
        assert cause is not None and refused in cause
    if ingest._literal_ip(urlsplit(url).hostname):
        assert resolver.asked == []  # literals are decided without a look-up


def test_check_url_allow_private_hosts_still_refuses_metadata():
    """allow_private_hosts lets private and loopback hosts through but never a metadata endpoint."""
    resolver = FakeResolver({"intranet.example": ["10.0.0.7"]})
    assert ingest.check_url("http://10.1.2.3/x", resolver, allow_private_hosts=True) is None
    assert ingest.check_url("http://intranet.example/x", resolver, allow_private_hosts=True) is None
    assert ingest.check_url("http://169.254.169.254/x", resolver, allow_private_hosts=True)
    assert ingest.check_url("http://metadata.google.internal/x", resolver, allow_private_hosts=True)
    assert ingest.check_url("ftp://example.org/x", resolver).startswith("malformed")


def test_connection_guard_checks_every_hop(monkeypatch):
    """The download workers' opener refuses a refused address at connect time, redirects included,
    without opening a socket to it, and still follows allowed redirects."""
    real_connect = socket.create_connection

    def loopback_only(address, *args, **kwargs):
        assert address[0] == "127.0.0.1", f"test tried to connect to {address}"
        return real_connect(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", loopback_only)
    images = make_images(1, seed=4)
    with ImageServer(images) as srv:
        strict = ingest.guarded_opener(allow_private_hosts=False)
        with pytest.raises(urllib.error.URLError, match="blocked address"):
            strict.open(srv.image_url("00000.jpg"), timeout=2)
        assert srv.total_requests == 0

        lenient = ingest.guarded_opener(allow_private_hosts=True)
        with lenient.open(srv.url("/redirect/00000.jpg"), timeout=2) as r:
            assert r.read() == images[0][1]
        to_metadata = srv.url("/redirect-to?url=http://169.254.169.254/latest/meta-data/")
        with pytest.raises(urllib.error.URLError, match="metadata"):
            lenient.open(to_metadata, timeout=2)
        assert srv.requests["/redirect-to"] == 1


@runs_img2dataset
def test_dns_rebinding_is_blocked_inside_download_workers(tmp_path):
    """A name that passed the plan's check but resolves to loopback when img2dataset connects is
    refused in the worker (blocked_address) and never reaches the server."""
    images = make_images(2, seed=5)
    with ImageServer(images) as srv:
        rows = [(f"http://localhost:{srv.port}/img/{n}", c) for n, _, c in images]
        url_list = write_url_list(tmp_path / "list.jsonl", rows, "jsonl")
        result = ingest.run(
            _config(tmp_path / "root", "rebind", url_list),
            resolver=FakeResolver({"localhost": ["93.184.216.34"]}),
        )
        assert srv.total_requests == 0
    assert result.failures == {"blocked_address": 2}
    assert result.exit_code == 1 and list(result.failed_shards) == ["00000"]


CASES = [
    ("tsv", True, ("url", "caption")),
    ("tsv", False, ("url", "caption")),
    ("tsv", False, ("caption", "url")),
    ("csv", True, ("caption", "url")),
    ("csv", False, ("url", "caption")),
    ("parquet", True, ("url", "caption")),
    ("jsonl", True, ("caption", "url")),
]


@pytest.mark.parametrize(("fmt", "header", "columns"), CASES)
def test_url_list_formats(tmp_path, fmt, header, columns):
    """tsv, csv (with and without header, either column order), parquet and jsonl normalize to
    the same (url, caption, uid) rows, and a trailing malformed row is counted."""
    rows = [
        {"url": "http://93.184.216.34/a.jpg", "caption": 'a red circle, "quoted"'},
        {"url": "https://93.184.216.34/b.jpg?x=1&y=2", "caption": "a blue square"},
        {"url": "not a url", "caption": "broken"},
    ]
    path = write_url_list(tmp_path / f"list.{fmt}", rows, fmt, columns=columns, header=header)
    table = ingest.read_url_list(path)
    assert table.url == [r["url"] for r in rows[:2]]
    assert table.caption == [r["caption"] for r in rows[:2]]
    assert table.uid == [ingest.row_uid(r["url"], r["caption"]) for r in rows[:2]]
    assert table.rows_in == 3 and table.counts == {"malformed_row": 1}


@pytest.mark.parametrize(
    ("preset", "columns"), [("cc3m", ("caption", "url")), ("cc12m", ("url", "caption"))]
)
def test_presets_column_orders(tmp_path, preset, columns):
    """The cc3m (caption<TAB>url) and cc12m (url<TAB>caption) presets read header-less TSVs."""
    rows = [("http://93.184.216.34/1.jpg", "a photo of a cat"), ("http://93.184.216.34/2.jpg", "")]
    rows_in_order = [dict(zip(("url", "caption"), r)) for r in rows]
    path = write_url_list(
        tmp_path / f"{preset}.tsv", rows_in_order, "tsv", columns=columns, header=False
    )
    with path.open("a") as f:
        f.write("three\tcolumns\there\n")
    table = ingest.read_url_list(path, preset=preset)
    assert list(zip(table.url, table.caption)) == rows
    assert table.counts == {"malformed_row": 1, "empty_caption": 1}


def test_other_names_and_bad_lines(tmp_path):
    """LAION-style URL/TEXT columns are found, and unparsable jsonl lines count as malformed."""
    pq.write_table(
        pa.table({"URL": ["http://93.184.216.34/a.jpg"], "TEXT": ["hi"]}), tmp_path / "l.parquet"
    )
    assert ingest.read_url_list(tmp_path / "l.parquet").caption == ["hi"]
    (tmp_path / "l.jsonl").write_text(
        '{"url": "http://93.184.216.34/a.jpg", "caption": "ok"}\n{oops\n[1, 2]\n'
    )
    table = ingest.read_url_list(tmp_path / "l.jsonl")
    assert len(table) == 1 and table.counts == {"malformed_row": 2}
    with pytest.raises(ValueError, match="url_col"):
        ingest.read_url_list(tmp_path / "l.parquet", url_col="link")


@runs_img2dataset
def test_incremental_noop_extend_retry_and_dry_run(tmp_path, capsys):
    """The same list again is a no-op, a second list adds only new shards, --retry-failed
    re-attempts only the earlier failures into new shards and then has nothing left, and
    --dry-run writes nothing."""
    images = make_images(8, seed=6)
    root = tmp_path / "root"
    with ImageServer(images, flaky_failures=1) as srv:
        list_a = write_url_list(
            tmp_path / "a.tsv",
            [(srv.image_url(n), c) for n, _, c in images[:4]]
            + [(srv.url(f"/flaky/{n}"), f"flaky {n}") for n, _, _ in images[4:6]],
            "tsv",
        )
        list_b = write_url_list(
            tmp_path / "b.csv",
            [(srv.image_url(n), c) for n, _, c in images[6:]]
            + [(srv.image_url(images[0][0]), images[0][2])]  # downloaded from list a
            + [(srv.url(f"/flaky/{images[4][0]}"), f"flaky {images[4][0]}")],  # failed in list a
            "csv",
        )
        kw = dict(samples_per_shard=3, allow_private_hosts=True)
        first = ingest.run(_config(root, "inc", list_a, **kw))
        assert first.new_shards == ["00000", "00001"] and first.failures == {"http_5xx": 2}

        before = _files(root)
        again = ingest.run(_config(root, "inc", list_a, **kw))
        assert again.status == "no-op" and "already ingested" in again.message
        assert _files(root) == before

        capsys.readouterr()
        dry = ingest.run(_config(root, "inc", list_b, dry_run=True, **kw))
        assert dry.status == "dry-run" and dry.rows_to_download == 2
        assert dry.planning == {"already_ingested": 1, "failed_before": 1}
        assert "to download          2 in 1 shards" in capsys.readouterr().out
        assert _files(root) == before

        second = ingest.run(_config(root, "inc", list_b, **kw))
        assert second.new_shards == ["00002"] and second.successes == 2
        assert srv.requests[f"/flaky/{images[4][0]}"] == 1  # left to --retry-failed

        requests_before = dict(srv.requests)
        retry = ingest.run(_config(root, "inc", None, retry_failed=True, **kw))
        assert (
            retry.new_shards == ["00003"] and retry.successes == 2 and retry.rows_to_download == 2
        )
        delta = {
            p: n - requests_before.get(p, 0)
            for p, n in srv.requests.items()
            if n != requests_before.get(p, 0)
        }
        assert delta == {f"/flaky/{n}": 1 for n, _, _ in images[4:6]}  # only the failed samples

        done = ingest.run(_config(root, "inc", None, retry_failed=True, **kw))
        assert done.status == "no-op" and "nothing left to retry" in done.message

    catalog = Catalog(root)
    records = catalog.committed(catalog.raw_dir("inc"))
    assert sorted(records) == ["00000", "00001", "00002", "00003"]
    assert sum(r.rows for r in records.values()) == 8  # every image exactly once
    manifest = json.loads(Path(catalog.raw_dir("inc"), "manifest.json").read_text())
    assert [s["kind"] for s in manifest["sources"].values()].count("retry") == 1


@runs_img2dataset
def test_whole_shard_failure_exit_code_and_retry(tmp_path, monkeypatch, capsys):
    """A shard with no image and a shard whose tar is unreadable make main() exit non-zero naming
    both; the unreadable shard is not committed and --retry-failed recovers it (the 404s stay)."""
    images = make_images(4, seed=7)
    real_inspect = rawcommit.inspect_shard

    def corrupt_shard_2(directory, shard):
        if shard == "00002":
            Path(directory, f"{shard}.tar").write_bytes(b"\x00garbage" * 100)
        return real_inspect(directory, shard)

    with ImageServer(images) as srv:
        rows = [(srv.image_url(n), c) for n, _, c in images[:2]]
        rows += [(srv.url("/404"), "gone 1"), (srv.url("/404"), "gone 2")]
        rows += [(srv.image_url(n), c) for n, _, c in images[2:]]
        url_list = write_url_list(tmp_path / "list.tsv", rows, "tsv", header=False)
        args = ["--corpus", "sf", "--root", str(tmp_path / "root"), "--samples-per-shard", "2",
                "--allow-private-hosts", "--image-size", "32", "--threads", "4", "--timeout", "2"]  # fmt: skip
        monkeypatch.setattr(rawcommit, "inspect_shard", corrupt_shard_2)
        assert ingest.main([*args, "--url-list", str(url_list)]) == 1
        out = capsys.readouterr().out
        assert "FAILED shard 00001" in out and "FAILED shard 00002" in out and "unreadable" in out

        catalog = Catalog(tmp_path / "root")
        raw = catalog.raw_dir("sf")
        records = catalog.committed(raw)
        assert sorted(records) == ["00000", "00001"] and records["00001"].failures == {
            "http_404": 2
        }
        assert Path(raw, "_failed", "00002.tar").exists() and not Path(raw, "00002.tar").exists()

        monkeypatch.setattr(rawcommit, "inspect_shard", real_inspect)
        assert ingest.main([*args, "--retry-failed"]) == 0
        assert srv.requests["/404"] == 2  # permanent failures are not retried
    records = Catalog(tmp_path / "root").committed(raw)
    assert sorted(records) == ["00000", "00001", "00003"] and records["00003"].rows == 2


def test_inspect_shard_rejects_missing_or_mismatched_tar(tmp_path):
    """inspect_shard reports a missing tar, and a tar whose images disagree with the parquet."""
    t = pa.table(
        {
            "key": ["000000"], "uid": ["u"], "status": ["success"], "error_message": [None],
            "sha256": ["ab"],
        }
    )  # fmt: skip
    pq.write_table(t, tmp_path / "00000.parquet")
    with pytest.raises(ingest.ShardError, match="missing"):
        ingest.inspect_shard(str(tmp_path), "00000")
    with tarfile.open(tmp_path / "00000.tar", "w"):
        pass
    with pytest.raises(ingest.ShardError, match="0 images but"):
        ingest.inspect_shard(str(tmp_path), "00000")


def test_failure_cause_mapping():
    """img2dataset's messages map to stable causes; only transient ones are retryable."""
    fc = ingest.failure_cause
    assert fc("failed_to_download", "HTTP Error 404: Not Found") == "http_404"
    assert fc("failed_to_download", "HTTP Error 403: Forbidden") == "http_4xx"
    assert fc("failed_to_download", "HTTP Error 503: Service Unavailable") == "http_5xx"
    assert fc("failed_to_download", "timed out") == "timeout"
    assert fc("failed_to_download", "<urlopen error timed out>") == "timeout"
    assert fc("failed_to_resize", "Image decoding error") == "truncated_image"
    assert fc("failed_to_download", "<urlopen error [Errno 111] Connection refused>") == (
        "other_error:connection refused"
    )
    assert fc("success", None) is None
    assert ingest.is_retryable("failed_to_download", "HTTP Error 429: Too Many Requests")
    assert not ingest.is_retryable("failed_to_download", "HTTP Error 404: Not Found")
    assert not ingest.is_retryable("failed_to_resize", "not an image: no known image signature")


def test_precheck_refuses_bombs_before_decoding():
    """A header declaring more than MAX_IMAGE_PIXELS is refused without decoding its pixels, even
    below OpenCV's own 2**30 limit."""
    from pipelines.synthetic import bomb_png

    assert "decompression bomb" in ingest.precheck_image(bomb_png(20_000))
    assert ingest.precheck_image(b"hello").startswith("not an image")
    assert ingest.precheck_image(make_images(1)[0][1]) is None


def test_ingest_config_grammar(tmp_path, capsys):
    """IngestConfig loads defaults < --config YAML < flags < key=value, keeps the README's flags,
    and a bad value is one line naming the field with exit status 2."""
    yaml = tmp_path / "ingest.yaml"
    yaml.write_text("corpus: from-yaml\nthreads: 3\ntimeout: 4.5\n")
    config = ingest.parse_command(
        ingest.IngestConfig,
        ["--config", str(yaml), "--corpus", "c1", "--url-list", "l.tsv", "--allow-private-hosts",
         "--samples-per-shard", "7", "--retry-failed", "--dry-run", "--root", "r", "threads=5"],
        prog="t", description="t",
    )  # fmt: skip
    assert (config.corpus, config.url_list, config.threads, config.timeout) == (
        "c1",
        "l.tsv",
        5,
        4.5,
    )
    assert config.allow_private_hosts and config.retry_failed and config.dry_run
    assert (config.samples_per_shard, config.root) == (7, "r")
    assert ingest.main(["--corpus", "c", "--url-list", "l.tsv", "--threads", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: threads must be >= 1, got 0"
    assert ingest.main(["--url-list", "l.tsv"]) == 2
    assert "corpus is required" in capsys.readouterr().err
    with pytest.raises(ValueError, match="url_list is required"):
        ingest.IngestConfig(corpus="c")
