"""The ingest stage: a URL list -> img2dataset webdataset shards in `<root>/corpora/<corpus>/raw/`.

    seedpipe ingest --corpus cc3m --url-list Train_GCC-training.tsv --preset cc3m [key=value ...]

One typed config, `IngestConfig` (defaults < --config YAML < --flags < key=value, through
`pipelines.config`); `run(config)` does, in order (each printed):
1. **Normalize** the list (tsv, csv, parquet, jsonl; `.gz` too) into a clean table `url, caption,
   uid` (`pipelines.urllists`: layouts, presets, the row uid, what is counted per row). Rows
   already downloaded into this corpus (same uid) are counted `already_ingested` and skipped, rows
   that failed in an earlier run `failed_before` (left to `retry_failed`).
2. **Refuse** URLs whose host is, or resolves to, a non-global address (`blocked_address`), unless
   `allow_private_hosts`; cloud metadata endpoints even then (`pipelines.netguard`).
3. **Plan**: rows to download, rows refused by cause, shards expected; `dry_run` stops here and
   writes nothing.
4. **Download** with img2dataset (`pipelines.download`; every URL bounded in time and bytes,
   images checked before decoding: `pipelines.fetch`, `pipelines.imagecheck`) into a staging
   folder on this node's scratch; each shard, once img2dataset has finished it, is checked there,
   put into `raw/` and committed (`pipelines.rawcommit`); then `raw/manifest.json`
   (`pipelines.rawcorpus`).
5. **Report**: failures per cause (`pipelines.rawcorpus.failure_cause`), a summary table; an
   MLflow run (`stage_run`) with the config, the URL list as input dataset and the raw corpus as
   output dataset, by content digest.

The exit status is 1 when any shard failed or nothing could be downloaded, 2 for a bad config.

Incremental runs: a URL list whose content digest is already in the manifest (ingested with the
same `allow_private_hosts`) is a no-op; a new list extends the corpus with new shards (its rows
that an earlier run downloaded or attempted are skipped); `retry_failed` re-attempts the samples
whose latest attempt failed for a transient reason (timeout, 5xx, 408/429, connection errors, lost
shards) and that no shard has recovered since, into new shards; with nothing left to retry it is a
no-op. Permanent failures (404, other 4xx, redirect loops, not an image, truncated, bomb, too
large) are not retried. A committed shard found damaged (unsound record, a file missing or
resized, an unreadable parquet: `rawcorpus.raw_state`) is reported as lost and set aside; the
next run of its list is then no no-op: it downloads just that shard's rows again. A run killed
during the download keeps every shard it committed (each is committed as soon as img2dataset has
finished it); the next run of its list downloads the rest.

Design choices:
- One ingest per corpus at a time (there is no lock). Call `run` from the main thread of a program
  with an `if __name__ == "__main__":` guard: img2dataset spawns its workers.
- The root is a local path or an object-store URI (`s3://bucket/prefix`; endpoint and
  credentials from the standard variables, `pipelines.storage`), with one code path for both:
  img2dataset writes to a per-run folder on this node's scratch (`storage.scratch_dir("ingest")`),
  the checks read the shards there, and only checked shards reach the catalog, a shard's files
  first and its completion record last (a rename on a local root, one object put per file on a
  store). Everything else (manifest, `_sources/`, `_failed/`, the checks of committed shards)
  goes through the catalog's filesystem. Not img2dataset writing to the store through fsspec:
  the checks would read every shard back, and a killed run would leave half-written objects in
  the corpus. The staging folder is deleted when the run ends, whatever the outcome; it holds
  only the shards in flight. The URL list may be a local file or an object-store URI (copied
  into the staging folder to be read).
- The public names of the modules above that ingest is built from are importable from here too.
"""

from __future__ import annotations

import math
import re
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from pipelines.catalog import Catalog, sha256_text
from pipelines.config import cli_main, parse_command
from pipelines.download import RESIZE_MODE
from pipelines.imagecheck import (
    DEADLINE_S,
    MAX_IMAGE_BYTES,
    MAX_IMAGE_PIXELS,
    MAX_RESIZE_PIXELS,
    GuardedResizer,
    precheck_image,
    sniff_image,
)
from pipelines.ingestplan import lost_of_source, refuse_blocked, retry_table, skip_earlier_rows
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
    literal_ip,
)
from pipelines.rawcommit import download_and_commit
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
    quarantine_lost,
    raw_shard_digest,
    raw_state,
    read_manifest,
)
from pipelines.storage import download, filesystem, is_remote, scratch_dir
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
    "RESIZE_MODE", "IngestConfig", "IngestResult", "refuse_blocked", "run", "main",
    # pipelines.urllists
    "CAPTION_MAX_CHARS", "CAPTION_NAMES", "FORMATS", "MAX_URL_CHARS", "PRESETS", "URL_NAMES",
    "UrlTable", "file_sha256", "list_format", "normalize_url", "read_url_list", "row_uid",
    # pipelines.netguard
    "METADATA_HOSTS", "METADATA_IPS", "BlockedAddressError", "Resolver", "address_refusal",
    "check_url", "guarded_create_connection", "guarded_opener", "host_refusal",
    # pipelines.imagecheck
    "DEADLINE_S", "MAX_IMAGE_BYTES", "MAX_IMAGE_PIXELS", "MAX_RESIZE_PIXELS", "GuardedResizer",
    "precheck_image", "sniff_image",
    # pipelines.rawcorpus
    "ENCODE_FORMAT", "FAILED", "MANIFEST", "RETRYABLE_HTTP", "SOURCES", "STAGING", "ShardError",
    "ShardInfo", "catalog_digest", "failure_cause", "inspect_shard", "is_retryable",
    "raw_shard_digest", "read_manifest",
]  # fmt: skip

_literal_ip = literal_ip  # its name before the split, still used by tests/test_ingest.py


@dataclass
class IngestResult:
    """What one ingest run did. `exit_code` is non-zero when a whole shard failed or nothing
    could be downloaded."""

    corpus: str
    raw_dir: str
    """The corpus's raw folder: a path on a local root, a URI on an object store."""
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
    """Successes per second of download_s."""
    download_s: float = 0.0
    """First shard start to last shard end (img2dataset's stats): the downloads, no start-up."""
    wall_s: float = 0.0
    """Wall time of the img2dataset call, worker start-up included."""
    lost_shards: dict[str, str] = field(default_factory=dict)
    """Committed shards found damaged (record, files or parquet) -> why; their rows are downloaded
    again (a no-op list run is not a no-op then)."""
    exit_code: int = 0
    run_id: str | None = None

    @property
    def causes(self) -> dict[str, int]:
        """Every counted cause, planning and download, in one dict."""
        out = Counter(self.planning)
        out.update(self.failures)
        return dict(out)


@dataclass(kw_only=True)
class IngestConfig:
    """What `seedpipe ingest` does: which list into which corpus, and how it downloads."""

    corpus: str = ""
    """Corpus name (letters, digits, . _ -); the shards go to <root>/corpora/<corpus>/raw. Required."""
    url_list: str | None = None
    """tsv, csv, parquet or jsonl (.gz allowed): a local path or an object-store URI; optional with
    retry_failed."""
    preset: str | None = None
    """Published layout of a header-less TSV: cc3m (caption, url) or cc12m (url, caption)."""
    url_col: str | None = None
    """URL column name (or 0-based index in a list without header)."""
    caption_col: str | None = None
    """Caption column name (or 0-based index in a list without header)."""
    root: str = "./seed-data"
    """Catalog root: a local path or an object-store URI (s3://bucket/prefix); shared storage on a
    cluster."""
    samples_per_shard: int = 10000
    """Rows per raw shard."""
    allow_private_hosts: bool = False
    """Allow loopback/private/link-local hosts (demo, tests); metadata endpoints stay refused."""
    retry_failed: bool = False
    """Re-attempt the transient failures (and lost shards) of earlier runs into new shards."""
    dry_run: bool = False
    """Print the plan, write nothing."""
    image_size: int = 224
    """Side of the centre-cropped images in the shards."""
    processes: int = 1
    """img2dataset download processes."""
    threads: int = 8
    """Download threads per process."""
    timeout: float = 10.0
    """Seconds one socket operation (connect, one read) may take."""
    deadline: float = DEADLINE_S
    """Overall seconds one URL may take: connect, redirects, headers and body together."""
    max_image_bytes: int = MAX_IMAGE_BYTES
    """Byte cap of one download: a larger Content-Length or body is refused (too_large)."""
    max_resize_pixels: int = MAX_RESIZE_PIXELS
    """Pixel budget of the centre-crop resize (aspect ratio x image_size^2): thinner images are
    refused from their header as decompression_bomb."""
    retries: int = 0
    """img2dataset's per-sample retries."""
    address: str | None = None
    """Ray cluster address: accepted like every command's; ingest does not use Ray."""

    def __post_init__(self) -> None:
        if not self.corpus:
            raise ValueError("corpus is required: --corpus NAME")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.corpus):
            raise ValueError(f"corpus {self.corpus!r}: use letters, digits, '.', '_' and '-'")
        if self.url_list is None and not self.retry_failed:
            raise ValueError("url_list is required (unless retry_failed)")
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        for name, low in (
            ("samples_per_shard", 1),
            ("image_size", 8),
            ("processes", 1),
            ("threads", 1),
            ("retries", 0),
        ):
            if (value := getattr(self, name)) < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        if self.max_resize_pixels < self.image_size**2:
            raise ValueError(
                f"max_resize_pixels must be >= image_size^2 = {self.image_size**2}, "
                f"got {self.max_resize_pixels}"
            )
        if self.max_image_bytes < 1024:
            raise ValueError(f"max_image_bytes must be >= 1024, got {self.max_image_bytes}")
        for name in ("timeout", "deadline"):
            if (value := getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")


# ==== the stage =================================================================================
def run(config: IngestConfig, *, resolver: Resolver | None = None) -> IngestResult:
    """Ingest a URL list (or retry earlier failures) into the corpus's raw shards.

    `resolver` (default `socket.getaddrinfo`) decides the planning-time address checks (tests pass
    a fake); the download workers always resolve for themselves.
    """
    # This run's node-local staging (img2dataset's output, a copy of a remote URL list): deleted at
    # the end whatever happens; its name is unique, so concurrent runs on one node never share it.
    with tempfile.TemporaryDirectory(
        prefix=f"{config.corpus}-", dir=scratch_dir("ingest"), ignore_cleanup_errors=True
    ) as staging:
        return _run(config, Path(staging), resolver)


def _run(config: IngestConfig, staging: Path, resolver: Resolver | None) -> IngestResult:
    url_list = config.url_list
    list_path = None if url_list is None else _readable_list(url_list, staging / "list")
    catalog = Catalog(config.root)
    corpus = config.corpus
    raw = catalog.raw_dir(corpus)
    manifest = read_manifest(catalog, raw)
    settings = {
        "image_size": config.image_size,
        "resize_mode": RESIZE_MODE,
        "encode_format": ENCODE_FORMAT,
    }
    if manifest.get("settings") and manifest["settings"] != settings:
        raise ValueError(
            f"corpus {corpus} was ingested with {manifest['settings']}; this run asks for {settings}: "
            "use another corpus name (or the same image_size)"
        )
    result = IngestResult(corpus=corpus, raw_dir=catalog.location(raw), status="", message="")
    list_digest = file_sha256(list_path) if list_path is not None else None
    # A committed shard that fails its checks is lost: reported, set aside, its rows re-downloaded.
    state = raw_state(catalog, raw)
    result.lost_shards = dict(sorted(state.lost.items()))
    for sid, why in result.lost_shards.items():
        print(f"lost shard {sid}: {why}; its rows are downloaded again")
    if state.lost and not config.dry_run:
        quarantine_lost(catalog, raw, manifest, state.lost)

    # ---- what to download -------------------------------------------------------------------
    if config.retry_failed:
        table, kind, origins = retry_table(catalog, raw, manifest, state, list_digest, url_list)
        if table is None:
            return _finish_noop(result, f"{corpus}: nothing left to retry")
        source_digest = sha256_text("retry", *sorted(table.uid))
    else:
        assert url_list is not None and list_path is not None and list_digest is not None
        kind, origins, source_digest = "list", [], list_digest
        known = manifest["sources"].get(list_digest)
        lost_here = state.lost.keys() & set((known or {}).get("shards", []))
        if (
            known
            and known.get("allow_private_hosts") == config.allow_private_hosts
            and not lost_here
            and not lost_of_source(manifest, list_digest)
        ):
            shards = known.get("shards", [])
            span = f"shards {shards[0]}-{shards[-1]}" if shards else "no shards"
            hint = " (--retry-failed re-attempts transient failures)" if known.get("failed") else ""
            return _finish_noop(
                result,
                f"{url_list}: already ingested (sha256 {list_digest[:12]}, {span}); nothing to do"
                + hint,
                source_digest=list_digest,
            )
        try:
            table = read_url_list(list_path, preset=config.preset, url_col=config.url_col,
                                  caption_col=config.caption_col)  # fmt: skip
        except ValueError as err:  # name the user's list, not its staged copy
            raise ValueError(str(err).replace(list_path, url_list)) from None
    result.source_digest = source_digest
    result.rows_in = table.rows_in

    table = skip_earlier_rows(state, table, retry_failed=config.retry_failed)
    table, reasons = refuse_blocked(
        table, allow_private_hosts=config.allow_private_hosts, resolver=resolver, threads=16
    )
    result.planning = {k: n for k, n in sorted(table.counts.items()) if n}
    result.blocked_reasons = dict(reasons.most_common())
    result.rows_to_download = len(table)
    num_shards = math.ceil(len(table) / config.samples_per_shard)
    _print_plan(result, url_list, kind, num_shards, config.samples_per_shard)

    if config.dry_run:
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

    from pipelines.tracking import stage_run

    with stage_run(catalog, stage="ingest", corpus=corpus, config=asdict(config)) as mlrun:
        result.run_id = mlrun.run_id
        if url_list is not None:
            mlrun.log_dataset(
                name=f"{corpus}/url-list/{_safe(Path(url_list).name)}",
                digest=list_digest or "",
                uri=url_list if is_remote(url_list) else Path(str(list_path)).as_uri(),
                context="input",
                rows=table.rows_in,
            )
        else:
            mlrun.log_dataset(
                name=f"{corpus}/retry", digest=source_digest, uri=catalog.uri(raw), context="input"
            )
        download_and_commit(
            catalog, raw, staging, table, result, manifest,
            kind=kind, origins=origins, settings=settings, config=config,
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
            "download_s": result.download_s,
            "new_shards": len(result.new_shards),
            "failed_shards": len(result.failed_shards),
        }
        metrics |= {f"rows.{k}": v for k, v in result.planning.items()}
        metrics |= {f"failures.{_safe(k)}": v for k, v in result.failures.items()}
        mlrun.log_metrics(metrics)
        mlrun.log_dict(asdict(result), "ingest_result.json")
    _print_summary(result)
    return result


def _readable_list(url_list: str, into: Path) -> str:
    """A local path of the URL list: the list itself, or its copy in `into` when it is on an
    object store (the readers and the digest read local files; the list is read whole anyway)."""
    try:
        fs, path = filesystem(url_list)
        is_file = fs.get_file_info(path).type == pafs.FileType.File
        if is_file and not isinstance(fs, pafs.LocalFileSystem):
            local = into / path.rsplit("/", 1)[-1]  # the same name: the format comes from it
            download(fs, path, local)
            return str(local)
    except (ValueError, OSError) as err:  # an unknown scheme, a store that refuses
        raise ValueError(f"url_list {url_list} cannot be read ({err})") from None
    if not is_file:
        raise ValueError(f"url_list {url_list} is not a file")
    return path


def _safe(name: str) -> str:
    return re.sub(r"[^\w.\- /]", "_", name)


def _finish_noop(result: IngestResult, message: str, source_digest: str = "") -> IngestResult:
    result.status, result.message, result.source_digest = "no-op", message, source_digest
    print(message)
    return result


# ==== report and command line ===================================================================
def _print_plan(result: IngestResult, url_list: Any, kind: str, num_shards: int, sps: int) -> None:
    what = f"retry of earlier failures in {result.corpus}" if kind == "retry" else str(url_list)
    print(f"ingest plan: {what} -> {result.raw_dir}")
    print(f"  rows read            {result.rows_in}")
    for cause, n in result.planning.items():
        print(f"  {cause:<20s} {n}")
    for reason, n in list(result.blocked_reasons.items())[:5]:
        print(f"    refused: {reason} ({n})")
    if result.lost_shards:
        print(f"  lost shards          {len(result.lost_shards)}: {', '.join(result.lost_shards)}")
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
        ("download seconds", f"{result.download_s:.1f}"),
        ("wall seconds", f"{result.wall_s:.1f}"),
    ]
    for label, value in rows:
        print(f"  {label:<28s} {value:>10}")
    for sid, why in result.failed_shards.items():
        print(f"  FAILED shard {sid}: {why}")
    print(result.message)


@cli_main
def main(argv: Sequence[str] | None = None) -> int:
    config = parse_command(
        IngestConfig,
        argv,
        prog="seedpipe ingest",
        description="Download a URL list into a corpus's raw shards with img2dataset "
        "(python -m pipelines.ingest; see the module docstring).",
    )
    return run(config).exit_code


if __name__ == "__main__":
    sys.exit(main())
