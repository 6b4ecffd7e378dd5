"""The ingest stage: a URL list -> img2dataset webdataset shards in `<root>/corpora/<corpus>/raw/`.

    python -m pipelines.ingest --corpus cc3m --url-list Train_GCC-training.tsv --preset cc3m

Steps, in order (each printed):
1. **Normalize** the list (tsv, csv, parquet, jsonl; `.gz` too) into a clean table `url, caption,
   uid` (`pipelines.urllists`: layouts, `--preset cc3m|cc12m`, the row uid, and what is counted
   `malformed_row`, `empty_caption`, `caption_truncated`, `duplicate_row`). Rows already
   downloaded into this corpus (same uid) are counted `already_ingested` and skipped, rows that
   failed in an earlier run `failed_before` (left to `--retry-failed`).
2. **Refuse** URLs whose host is, or resolves to, a loopback, private, link-local, reserved,
   unspecified, multicast or otherwise non-global address (`blocked_address`), unless
   `allow_private_hosts`; cloud metadata endpoints even then (`pipelines.netguard`).
3. **Plan**: rows to download, rows refused by cause, shards expected; `--dry-run` stops here and
   writes nothing.
4. **Download** with img2dataset (webdataset + per-shard parquet and `_stats.json`, sha256 per
   sample, center-crop resize to `image_size`) through `GuardedResizer` (`pipelines.imagecheck`:
   decompression bombs, non-images, and the connection guard in every download worker) into
   `raw/_staging/`, then move each verified shard into `raw/` and write its completion record
   (`Catalog.commit`) last, then `raw/manifest.json` (`pipelines.rawcorpus`).
5. **Report**: failures per cause (`pipelines.rawcorpus.failure_cause`), a summary table; an
   MLflow run (`pipelines.lineage.stage_run`) with the URL list as input dataset and the raw
   corpus as output dataset, by content digest.

A shard whose tar or parquet is missing, unreadable or inconsistent is not committed: every one
of its samples counts `shard_failed` and its files go to `raw/_failed/`. A shard with no successful
sample is committed (its parquet keeps the per-sample errors) but also counts as failed: the exit
status is 1 when any shard failed or nothing could be downloaded.

Incremental runs: a URL list whose content digest is already in the manifest (ingested with the
same `allow_private_hosts`) is a no-op; a new list extends the corpus with new shards (its rows
that an earlier run downloaded or attempted are skipped); `--retry-failed` re-attempts the samples
whose latest attempt failed for a transient reason (timeout, 5xx, 408/429, connection errors, lost
shards) and that no shard has recovered since, into new shards; with nothing left to retry it is a
no-op. Permanent failures (404, other 4xx, not an image, truncated, bomb) are not retried.

Design choices:
- img2dataset's extend mode globs `*.json` in its output folder and cannot parse the catalog's
  `NNNNN.done.json`, so the download runs in `raw/_staging/` with the first shard id set by ingest
  (its `Reader` is wrapped for the call).
- One ingest per corpus at a time (there is no lock). Call `run` from the main thread of a program
  with an `if __name__ == "__main__":` guard: img2dataset spawns its workers and sets a SIGINT
  handler (ingest restores the previous one and turns its exit(0) into KeyboardInterrupt).
- The root must be a local path (a shared filesystem mount on a cluster): the shard checks read
  the staging folder through the local filesystem.
- The public names of the modules above that ingest is built from are importable from here too.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import json
import math
import re
import signal
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from unittest import mock

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.catalog import Catalog, DoneRecord, sha256_text
from pipelines.imagecheck import MAX_IMAGE_PIXELS, GuardedResizer, precheck_image, sniff_image
from pipelines.netguard import (
    METADATA_HOSTS,
    METADATA_IPS,
    BlockedAddressError,
    Resolver,
    address_refusal,
    check_url,
    guarded_create_connection,
    guarded_opener,
    host_refusal,
    host_refusals,
    literal_ip,
)
from pipelines.rawcorpus import (
    ENCODE_FORMAT,
    FAILED,
    MANIFEST,
    RETRYABLE_HTTP,
    SOURCES,
    STAGING,
    ShardError,
    ShardInfo,
    catalog_digest,
    failure_cause,
    inspect_shard,
    is_retryable,
    next_shard_id,
    quarantine_shard,
    raw_shard_digest,
    read_manifest,
    sample_outcomes,
    shard_name,
    sweep_leftovers,
    write_manifest,
)
from pipelines.urllists import (
    CAPTION_MAX_CHARS,
    CAPTION_NAMES,
    FORMATS,
    MAX_URL_CHARS,
    PRESETS,
    URL_NAMES,
    UrlTable,
    file_sha256,
    list_format,
    normalize_url,
    read_url_list,
    row_uid,
)

__all__ = [
    # the stage
    "RESIZE_MODE", "IngestResult", "refuse_blocked", "run", "build_parser", "main",
    # pipelines.urllists
    "CAPTION_MAX_CHARS", "CAPTION_NAMES", "FORMATS", "MAX_URL_CHARS", "PRESETS", "URL_NAMES",
    "UrlTable", "file_sha256", "list_format", "normalize_url", "read_url_list", "row_uid",
    # pipelines.netguard
    "METADATA_HOSTS", "METADATA_IPS", "BlockedAddressError", "Resolver", "address_refusal",
    "check_url", "guarded_create_connection", "guarded_opener", "host_refusal",
    # pipelines.imagecheck
    "MAX_IMAGE_PIXELS", "GuardedResizer", "precheck_image", "sniff_image",
    # pipelines.rawcorpus
    "ENCODE_FORMAT", "FAILED", "MANIFEST", "RETRYABLE_HTTP", "SOURCES", "STAGING", "ShardError",
    "ShardInfo", "catalog_digest", "failure_cause", "inspect_shard", "is_retryable",
    "raw_shard_digest", "read_manifest",
]  # fmt: skip

_literal_ip = literal_ip  # its name before the split, still used by tests/test_ingest.py

RESIZE_MODE = "center_crop"


@dataclass
class IngestResult:
    """What one ingest run did. `exit_code` is non-zero when a whole shard failed or nothing
    could be downloaded."""

    corpus: str
    raw_dir: str
    status: str
    """ingested | no-op | dry-run | nothing-downloadable"""
    message: str
    source_digest: str = ""
    rows_in: int = 0
    planning: dict[str, int] = field(default_factory=dict)
    """Row counts before download: malformed_row, duplicate_row, blocked_address,
    already_ingested, failed_before, empty_caption, caption_truncated (the last two: kept rows)."""
    blocked_reasons: dict[str, int] = field(default_factory=dict)
    rows_to_download: int = 0
    successes: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    """Download failures by cause, over the new shards (+ shard_failed)."""
    new_shards: list[str] = field(default_factory=list)
    failed_shards: dict[str, str] = field(default_factory=dict)
    images_per_s: float = 0.0
    """Successes per second of download (img2dataset's shard start/end times)."""
    wall_s: float = 0.0
    """Wall time of the img2dataset call, worker start-up included."""
    exit_code: int = 0
    run_id: str | None = None

    @property
    def causes(self) -> dict[str, int]:
        """Every counted cause, planning and download, in one dict."""
        out = Counter(self.planning)
        out.update(self.failures)
        return dict(out)


@dataclass(frozen=True, kw_only=True)
class _Download:
    """The img2dataset options of one run (`run`'s arguments of the same names)."""

    samples_per_shard: int
    allow_private_hosts: bool
    image_size: int
    processes: int
    threads: int
    timeout_s: float
    retries: int

    def __post_init__(self) -> None:
        for name, low in (
            ("samples_per_shard", 1),
            ("image_size", 8),
            ("processes", 1),
            ("threads", 1),
            ("retries", 0),
        ):
            if (value := getattr(self, name)) < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")


# ==== planning ==================================================================================
def refuse_blocked(
    table: UrlTable,
    *,
    allow_private_hosts: bool,
    resolver: Resolver | None = None,
    threads: int = 16,
) -> tuple[UrlTable, Counter[str]]:
    """Drop rows whose host is refused (`blocked_address`); each distinct host is resolved once.

    With `allow_private_hosts` only literals and metadata names can be refused, so nothing is
    resolved here (the download workers' connection guard still checks every address).
    """
    causes = host_refusals(
        table.url, allow_private_hosts=allow_private_hosts, resolver=resolver, threads=threads
    )
    reasons: Counter[str] = Counter(cause for cause in causes if cause)
    kept = table.subset([cause is None for cause in causes])
    kept.counts["blocked_address"] += sum(reasons.values())
    return kept, reasons


def _skip_earlier_rows(
    catalog: Catalog, raw: str, table: UrlTable, *, retry_failed: bool
) -> UrlTable:
    """Drop rows this corpus has downloaded (`already_ingested`) or, unless retrying, attempted
    (`failed_before`)."""
    success, failed = sample_outcomes(catalog, raw) if catalog.exists(raw) else (set(), {})
    if not (success or failed):
        return table
    # Earlier failures are re-attempted by --retry-failed only (which knows which are transient).
    seen = [u in success or (not retry_failed and u in failed) for u in table.uid]
    table.counts["already_ingested"] += sum(u in success for u in table.uid)
    table.counts["failed_before"] += sum(s and u not in success for s, u in zip(seen, table.uid))
    return table.subset([not s for s in seen])


def _retry_table(
    catalog: Catalog, raw: str, manifest: dict[str, Any], list_digest: str | None, url_list: Any
) -> tuple[UrlTable | None, str, list[str]]:
    """The rows to retry: submitted earlier, not recovered, last failure transient (or shard lost)."""
    sources = {d: s for d, s in manifest["sources"].items() if s.get("kind") == "list"}
    if list_digest is not None:
        if list_digest not in sources:
            raise ValueError(
                f"{url_list} was never ingested into this corpus: nothing to retry from"
            )
        sources = {list_digest: sources[list_digest]}
    success, latest = sample_outcomes(catalog, raw)
    table = UrlTable()
    for digest in sorted(sources):
        path = f"{raw}/{SOURCES}/{digest[:16]}.parquet"
        if not catalog.exists(path):
            continue
        rows = UrlTable.from_arrow(pq.read_table(path))
        for i, uid in enumerate(rows.uid):
            if uid in success or uid in table:
                continue
            if uid in latest and not is_retryable(*latest[uid]):
                continue
            table.add_normalized(rows.url[i], rows.caption[i], uid, rows.note[i])
    table.rows_in = len(table)
    return (table if len(table) else None), "retry", sorted(sources)


# ==== the stage =================================================================================
def run(
    *,
    root: str | Path,
    corpus: str,
    url_list: str | Path | None,
    preset: str | None = None,
    url_col: str | None = None,
    caption_col: str | None = None,
    samples_per_shard: int = 10000,
    allow_private_hosts: bool = False,
    retry_failed: bool = False,
    dry_run: bool = False,
    image_size: int = 224,
    processes: int = 1,
    threads: int = 8,
    timeout_s: float = 10,
    retries: int = 0,
    resolver: Resolver | None = None,
) -> IngestResult:
    """Ingest a URL list (or retry earlier failures) into the corpus's raw shards."""
    download = _Download(
        samples_per_shard=samples_per_shard, allow_private_hosts=allow_private_hosts,
        image_size=image_size, processes=processes, threads=threads, timeout_s=timeout_s,
        retries=retries,
    )  # fmt: skip
    if url_list is None and not retry_failed:
        raise ValueError("url_list is required (unless retry_failed)")
    if url_list is not None and not Path(url_list).is_file():
        raise ValueError(f"url_list {url_list} is not a file")
    catalog = Catalog(root)
    if "://" in catalog.root_uri and not catalog.root_uri.startswith("file://"):
        raise ValueError(
            f"root {catalog.root_uri}: ingest writes through the local filesystem; on a cluster use "
            "a shared filesystem mount as root"
        )
    raw = catalog.raw_dir(corpus)
    manifest = read_manifest(catalog, raw)
    settings = {
        "image_size": image_size,
        "resize_mode": RESIZE_MODE,
        "encode_format": ENCODE_FORMAT,
    }
    if manifest.get("settings") and manifest["settings"] != settings:
        raise ValueError(
            f"corpus {corpus} was ingested with {manifest['settings']}; this run asks for {settings}: "
            "use another corpus name (or the same image_size)"
        )
    config = {
        "root": str(root), "corpus": corpus, "url_list": str(url_list) if url_list else None,
        "preset": preset, "url_col": url_col, "caption_col": caption_col,
        "samples_per_shard": samples_per_shard, "allow_private_hosts": allow_private_hosts,
        "retry_failed": retry_failed, "image_size": image_size, "resize_mode": RESIZE_MODE,
        "encode_format": ENCODE_FORMAT, "processes": processes, "threads": threads,
        "timeout_s": timeout_s, "retries": retries, "caption_max_chars": CAPTION_MAX_CHARS,
        "max_image_pixels": MAX_IMAGE_PIXELS,
    }  # fmt: skip
    result = IngestResult(corpus=corpus, raw_dir=raw, status="", message="")
    list_digest = file_sha256(url_list) if url_list is not None else None

    # ---- what to download -------------------------------------------------------------------
    if retry_failed:
        table, kind, origins = _retry_table(catalog, raw, manifest, list_digest, url_list)
        if table is None:
            return _finish_noop(result, f"{corpus}: nothing left to retry")
        source_digest = sha256_text("retry", *sorted(table.uid))
    else:
        assert url_list is not None and list_digest is not None
        kind, origins, source_digest = "list", [], list_digest
        known = manifest["sources"].get(list_digest)
        if known and known.get("allow_private_hosts") == allow_private_hosts:
            shards = known.get("shards", [])
            span = f"shards {shards[0]}-{shards[-1]}" if shards else "no shards"
            return _finish_noop(
                result,
                f"{url_list}: already ingested (sha256 {list_digest[:12]}, {span}); nothing to do"
                + (
                    " (--retry-failed re-attempts transient failures)"
                    if known.get("failed")
                    else ""
                ),
                source_digest=list_digest,
            )
        table = read_url_list(url_list, preset=preset, url_col=url_col, caption_col=caption_col)
    result.source_digest = source_digest
    result.rows_in = table.rows_in

    table = _skip_earlier_rows(catalog, raw, table, retry_failed=retry_failed)
    table, reasons = refuse_blocked(
        table, allow_private_hosts=allow_private_hosts, resolver=resolver, threads=16
    )
    result.planning = {k: n for k, n in sorted(table.counts.items()) if n}
    result.blocked_reasons = dict(reasons.most_common())
    result.rows_to_download = len(table)
    num_shards = math.ceil(len(table) / samples_per_shard)
    _print_plan(result, url_list, kind, num_shards, samples_per_shard)

    if dry_run:
        result.status, result.message = "dry-run", "dry run: nothing written"
        print(result.message)
        return result
    if len(table) == 0:
        p = result.planning
        if (p.get("already_ingested") or p.get("failed_before")) and not (
            p.get("malformed_row") or p.get("blocked_address")
        ):
            return _finish_noop(
                result,
                f"{url_list}: every row was downloaded or attempted before; nothing to do"
                + (" (--retry-failed re-attempts failures)" if p.get("failed_before") else ""),
            )
        result.status, result.exit_code = "nothing-downloadable", 1
        result.message = f"{url_list}: no row can be downloaded (see the refusals above)"
        print(f"error: {result.message}")
        return result

    from pipelines.lineage import stage_run

    with stage_run(catalog, stage="ingest", corpus=corpus, config=config) as mlrun:
        result.run_id = mlrun.run_id
        if url_list is not None:
            mlrun.log_dataset(
                name=f"{corpus}/url-list/{_safe(Path(url_list).name)}",
                digest=list_digest or "",
                uri=Path(url_list).resolve().as_uri(),
                context="input",
                rows=table.rows_in,
            )
        else:
            mlrun.log_dataset(
                name=f"{corpus}/retry", digest=source_digest, uri=catalog.uri(raw), context="input"
            )
        _download_and_commit(
            catalog, raw, table, result, manifest,
            kind=kind, origins=origins, url_list=url_list, settings=settings, download=download,
        )  # fmt: skip
        out_digest = catalog_digest(catalog, raw)
        mlrun.log_dataset(
            name=f"{corpus}/raw",
            digest=out_digest,
            uri=catalog.uri(raw),
            context="output",
            rows=sum(r.rows for r in catalog.committed(raw).values()),
        )
        metrics = {
            "rows_in": result.rows_in,
            "rows_to_download": result.rows_to_download,
            "successes": result.successes,
            "failed_samples": sum(result.failures.values()),
            "images_per_s": result.images_per_s,
            "new_shards": len(result.new_shards),
            "failed_shards": len(result.failed_shards),
        }
        metrics |= {f"rows.{k}": v for k, v in result.planning.items()}
        metrics |= {f"failures.{_safe(k)}": v for k, v in result.failures.items()}
        mlrun.log_metrics(metrics)
        mlrun.log_dict(asdict(result), "ingest_result.json")
    _print_summary(result)
    return result


def _safe(name: str) -> str:
    return re.sub(r"[^\w.\- /]", "_", name)


def _finish_noop(result: IngestResult, message: str, source_digest: str = "") -> IngestResult:
    result.status, result.message, result.source_digest = "no-op", message, source_digest
    print(message)
    return result


# ==== download and commit =======================================================================
def _download_and_commit(
    catalog: Catalog,
    raw: str,
    table: UrlTable,
    result: IngestResult,
    manifest: dict[str, Any],
    *,
    kind: str,
    origins: list[str],
    url_list: Any,
    settings: dict[str, Any],
    download: _Download,
) -> None:
    catalog.fs.create_dir(raw, recursive=True)
    sweep_leftovers(catalog, raw)
    first_id = next_shard_id(catalog, raw)
    staging = f"{raw}/{STAGING}"
    out_dir = f"{staging}/out"
    catalog.fs.create_dir(out_dir, recursive=True)
    if kind == "list":  # every row ever submitted from this list, for --retry-failed
        _record_submitted(catalog, f"{raw}/{SOURCES}/{result.source_digest[:16]}.parquet", table)
    input_path = f"{staging}/input.parquet"
    catalog.write_atomic(
        input_path, _parquet_bytes(table.to_arrow().select(["url", "caption", "uid"]))
    )
    result.wall_s = _run_img2dataset(input_path, out_dir, first_id=first_id, download=download)

    source = {
        "kind": kind, "uri": str(url_list) if url_list else catalog.uri(raw), "rows": result.rows_in,
        "submitted": len(table), "allow_private_hosts": download.allow_private_hosts,
        "origins": origins, "planning": result.planning, "shards": [], "failed_shards": {},
        "ingested_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }  # fmt: skip
    failures, spans = _commit_shards(
        catalog, raw, out_dir, table, result, first_id, download.samples_per_shard
    )
    catalog.fs.delete_dir(staging)

    result.failures = dict(sorted(failures.items()))
    # Download throughput over the shards' own start/end times (img2dataset's stats), which leaves
    # out the start-up of its worker processes; wall_s includes it.
    busy = max((e for _, e in spans), default=0.0) - min((s for s, _ in spans), default=0.0)
    result.images_per_s = result.successes / busy if busy > 0 else 0.0
    source["shards"] = list(result.new_shards)
    source["failed_shards"] = result.failed_shards
    source["failed"] = sum(failures.values())
    if earlier := manifest["sources"].get(result.source_digest):  # the same list, run again
        source["shards"] = earlier["shards"] + source["shards"]
        source["failed_shards"] = earlier["failed_shards"] | source["failed_shards"]
        source["failed"] += earlier["failed"]
        source["submitted"] += earlier["submitted"]
    manifest["sources"][result.source_digest] = source
    manifest["settings"] = settings
    manifest["corpus"] = result.corpus
    write_manifest(catalog, raw, manifest)
    if result.failed_shards or result.successes == 0:
        result.exit_code = 1
    result.status = "ingested"
    result.message = f"{len(result.new_shards)} new shards, {result.successes} images" + (
        f"; {len(result.failed_shards)} shards failed: {', '.join(result.failed_shards)}"
        if result.failed_shards
        else ""
    )


def _record_submitted(catalog: Catalog, path: str, table: UrlTable) -> None:
    """Add the rows of `table` to the list's `_sources` parquet (rows already there stay once)."""
    submitted = table.to_arrow()
    if catalog.exists(path):  # the same list again (e.g. allow_private_hosts changed)
        before = pq.read_table(path)
        fresh = pc.invert(pc.is_in(submitted["uid"], value_set=before["uid"].combine_chunks()))
        submitted = pa.concat_tables([before, submitted.filter(fresh)])
    catalog.write_atomic(path, _parquet_bytes(submitted))


def _run_img2dataset(input_path: str, out_dir: str, *, first_id: int, download: _Download) -> float:
    """Download the rows of `input_path` into shards `first_id`, ... of `out_dir`; returns the
    wall seconds of the img2dataset call."""
    i2d = importlib.import_module("img2dataset.main")  # the package re-exports a function `main`

    def reader_from_first_id(*args: Any, **kwargs: Any) -> Any:
        reader = real_reader(*args, **kwargs)
        reader.start_shard_id = first_id  # shard ids continue the corpus (see module docstring)
        return reader

    real_reader = i2d.Reader
    resizer = functools.partial(GuardedResizer, allow_private_hosts=download.allow_private_hosts)
    start = time.perf_counter()
    previous_sigint = signal.getsignal(signal.SIGINT)
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(i2d, "Reader", reader_from_first_id))
        stack.enter_context(mock.patch.object(i2d, "Resizer", resizer))
        # download() installs a SIGINT handler that exits with status 0 and never removes it.
        stack.callback(signal.signal, signal.SIGINT, previous_sigint)
        stack.enter_context(_interrupt_is_not_success())
        i2d.download(
            url_list=input_path,
            input_format="parquet",
            url_col="url",
            caption_col="caption",
            save_additional_columns=["uid"],
            output_folder=out_dir,
            output_format="webdataset",
            image_size=download.image_size,
            resize_mode=RESIZE_MODE,
            encode_format=ENCODE_FORMAT,
            processes_count=download.processes,
            thread_count=download.threads,
            timeout=download.timeout_s,
            retries=download.retries,
            number_sample_per_shard=download.samples_per_shard,
            extract_exif=False,
            compute_hash="sha256",
            enable_wandb=False,
            distributor="multiprocessing",
            incremental_mode="extend",
            max_shard_retry=1,
        )
    return time.perf_counter() - start


@contextlib.contextmanager
def _interrupt_is_not_success() -> Iterator[None]:
    try:
        yield
    except SystemExit as exit_:  # img2dataset's Ctrl-C handler: sys.exit(0)
        raise KeyboardInterrupt("ingest interrupted during download") from exit_


def _commit_shards(
    catalog: Catalog,
    raw: str,
    out_dir: str,
    table: UrlTable,
    result: IngestResult,
    first_id: int,
    samples_per_shard: int,
) -> tuple[Counter[str], list[tuple[float, float]]]:
    """Check each downloaded shard, move it into `raw/` and commit it, or quarantine it.

    Records new and failed shards and successes in `result`; returns the failures by cause and
    each shard's (start, end) download time.
    """
    notes = dict(zip(table.uid, table.note, strict=True))
    failures: Counter[str] = Counter()
    spans: list[tuple[float, float]] = []
    for i in range(math.ceil(len(table) / samples_per_shard)):
        sid = shard_name(first_id + i)
        expected = table.uid[i * samples_per_shard : (i + 1) * samples_per_shard]
        try:
            stats_path = Path(out_dir, f"{sid}_stats.json")
            if not stats_path.exists():
                raise ShardError(
                    f"shard {sid}: img2dataset did not finish it (no {stats_path.name})"
                )
            stats = json.loads(stats_path.read_text())
            spans.append((stats["start_time"], stats["end_time"]))
            info = inspect_shard(out_dir, sid)
            if sorted(info.uids) != sorted(expected):
                raise ShardError(
                    f"shard {sid}: its rows are not the {len(expected)} rows sent to it"
                )
        except ShardError as err:
            result.failed_shards[sid] = str(err)
            failures["shard_failed"] += len(expected)
            quarantine_shard(catalog, out_dir, raw, sid)
            continue
        for suffix in (".tar", ".parquet", "_stats.json"):
            catalog.fs.move(f"{out_dir}/{sid}{suffix}", f"{raw}/{sid}{suffix}")
        caption_notes = Counter(notes[u] for u in info.uids if notes.get(u))
        record = DoneRecord(
            shard=sid,
            stage="raw",
            digest=info.digest,
            files=[f"{sid}.tar", f"{sid}.parquet"],
            rows=info.successes,
            failures=info.failures,
            extra={
                "samples": info.samples,
                "source": result.source_digest,
                "caption_notes": dict(caption_notes),
            },
        )
        catalog.commit(raw, record)
        result.new_shards.append(sid)
        result.successes += info.successes
        failures.update(info.failures)
        if info.successes == 0:
            result.failed_shards[sid] = (
                f"shard {sid}: none of its {info.samples} samples downloaded"
            )
    return failures, spans


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


# ==== report and command line ===================================================================
def _print_plan(result: IngestResult, url_list: Any, kind: str, num_shards: int, sps: int) -> None:
    what = f"retry of earlier failures in {result.corpus}" if kind == "retry" else str(url_list)
    print(f"ingest plan: {what} -> {result.raw_dir}")
    print(f"  rows read            {result.rows_in}")
    for cause, n in result.planning.items():
        print(f"  {cause:<20s} {n}")
    for reason, n in list(result.blocked_reasons.items())[:5]:
        print(f"    refused: {reason} ({n})")
    print(f"  to download          {result.rows_to_download} in {num_shards} shards of <= {sps}")


def _print_summary(result: IngestResult) -> None:
    print(f"ingest summary: {result.corpus} ({result.raw_dir})")
    rows = [
        ("rows in", result.rows_in),
        ("rows to download", result.rows_to_download),
        ("images downloaded", result.successes),
        ("failed samples", sum(result.failures.values())),
        *((f"  {cause}", n) for cause, n in result.failures.items()),
        ("new shards", len(result.new_shards)),
        ("images/s", f"{result.images_per_s:.1f}"),
        ("wall seconds", f"{result.wall_s:.1f}"),
    ]
    for label, value in rows:
        print(f"  {label:<28s} {value:>10}")
    for sid, why in result.failed_shards.items():
        print(f"  FAILED shard {sid}: {why}")
    print(result.message)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipelines.ingest",
        description="Download a URL list into a corpus's raw shards with img2dataset (see module docstring).",
    )
    p.add_argument("--corpus", required=True, help="corpus name (letters, digits, . _ -)")
    p.add_argument(
        "--url-list", help="tsv, csv, parquet or jsonl (.gz allowed); optional with --retry-failed"
    )
    p.add_argument("--preset", choices=sorted(PRESETS), help="published layout: cc3m or cc12m TSV")
    p.add_argument("--url-col", help="URL column name (or 0-based index without header)")
    p.add_argument("--caption-col", help="caption column name (or 0-based index without header)")
    p.add_argument("--samples-per-shard", type=int, default=10000)
    p.add_argument("--allow-private-hosts", action="store_true",
                   help="allow loopback/private/link-local hosts (demo, tests); metadata hosts stay refused")  # fmt: skip
    p.add_argument(
        "--retry-failed", action="store_true", help="re-attempt transient failures into new shards"
    )
    p.add_argument("--dry-run", action="store_true", help="print the plan, write nothing")
    p.add_argument("--root", default="./seed-data", help="catalog root (default ./seed-data)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--processes", type=int, default=1)
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--timeout", type=float, default=10, help="per-request timeout in seconds")
    p.add_argument("--retries", type=int, default=0, help="img2dataset's per-sample retries")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = run(
            root=args.root,
            corpus=args.corpus,
            url_list=args.url_list,
            preset=args.preset,
            url_col=args.url_col,
            caption_col=args.caption_col,
            samples_per_shard=args.samples_per_shard,
            allow_private_hosts=args.allow_private_hosts,
            retry_failed=args.retry_failed,
            dry_run=args.dry_run,
            image_size=args.image_size,
            processes=args.processes,
            threads=args.threads,
            timeout_s=args.timeout,
            retries=args.retries,
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
