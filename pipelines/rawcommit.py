"""Ingest's second half: img2dataset's output, staged on this node's scratch -> checked, committed
raw shards + manifest.

How a shard reaches the catalog (one code path for a local root and an object store):
- img2dataset writes into `staging`, a per-run folder on this node's scratch that `ingest.run`
  creates and deletes (`pipelines.storage.scratch_dir`). Not straight to the store through
  fsspec: the checks would then read every shard back from the store, and a killed run would
  leave half-written objects under the corpus.
- `ShardCommitter` commits each shard as soon as img2dataset has finished it (its stats file,
  written after the tar and parquet are closed, is complete): the shard is checked locally
  (`inspect_shard`), its files are put into `raw/` (`rawcorpus.put_staged`: a rename on a local
  root, one object put per file on a store) and its completion record is written last. So the
  scratch holds only the shards in flight (a whole CC12M download would not fit one node's disk),
  and a killed run keeps every shard it committed: the next run of its list downloads the rest.
- A record's sizes and sha256 are computed from the staged files (`Catalog.commit` would read
  every tar back from the store); the stored sizes are checked before the record is written.

A shard whose tar or parquet is missing, unreadable or inconsistent is not committed: every one
of its samples counts `shard_failed` and its files go to `raw/_failed/`. A shard with no successful
sample is committed (its parquet keeps the per-sample errors) but also counts as failed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import threading
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.catalog import Catalog, DoneRecord
from pipelines.download import run_img2dataset
from pipelines.rawcorpus import (
    SOURCES,
    ShardError,
    inspect_shard,
    next_shard_id,
    put_staged,
    quarantine_shard,
    shard_name,
    sweep_leftovers,
    write_manifest,
)
from pipelines.urllists import UrlTable

if TYPE_CHECKING:
    from pipelines.ingest import IngestConfig, IngestResult

log = logging.getLogger(__name__)
POLL_S = 1.0
"""How often the committer looks for shards that img2dataset has finished."""


def download_and_commit(
    catalog: Catalog,
    raw: str,
    staging: Path,
    table: UrlTable,
    result: IngestResult,
    manifest: dict[str, Any],
    *,
    kind: str,
    origins: list[str],
    settings: dict[str, Any],
    config: IngestConfig,
) -> None:
    """Download `table` into new shards (staged in `staging`, a node-local folder the caller
    deletes), commit the good ones, update `result` and the manifest."""
    catalog.fs.create_dir(raw, recursive=True)
    sweep_leftovers(catalog, raw)
    first_id = next_shard_id(catalog, raw)
    if kind == "list":  # every row ever submitted from this list, for --retry-failed
        record_submitted(catalog, f"{raw}/{SOURCES}/{result.source_digest[:16]}.parquet", table)
    out_dir = staging / "out"
    input_path = staging / "input.parquet"
    pq.write_table(table.to_arrow().select(["url", "caption", "uid"]), input_path)

    source = {
        "kind": kind, "uri": config.url_list or catalog.uri(raw), "rows": result.rows_in,
        "submitted": len(table), "allow_private_hosts": config.allow_private_hosts,
        "origins": origins, "planning": result.planning, "shards": [], "failed_shards": {},
        "ingested_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }  # fmt: skip
    committer = ShardCommitter(catalog, raw, out_dir, table, result, first_id,
                               config.samples_per_shard)  # fmt: skip
    with committer.watching():
        result.wall_s = run_img2dataset(str(input_path), str(out_dir), first_id=first_id,
                                        config=config)  # fmt: skip
    committer.finish()
    failures, spans = committer.failures, committer.spans

    result.failures = dict(sorted(failures.items()))
    # Download throughput over the shards' own start/end times (img2dataset's stats), which leaves
    # out the start-up of its worker processes; wall_s includes it.
    busy = max((e for _, e in spans), default=0.0) - min((s for s, _ in spans), default=0.0)
    result.download_s = busy
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
    for lost in manifest.get("lost_shards", {}).values():  # their rows were candidates this run
        if kind == "retry" or lost.get("source") == result.source_digest:
            lost["rebuilt"] = True
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


def record_submitted(catalog: Catalog, path: str, table: UrlTable) -> None:
    """Add the rows of `table` to the list's `_sources` parquet (rows already there stay once)."""
    submitted = table.to_arrow()
    if catalog.exists(path):  # the same list again (e.g. allow_private_hosts changed)
        before = pq.read_table(path, filesystem=catalog.fs)
        fresh = pc.invert(pc.is_in(submitted["uid"], value_set=before["uid"].combine_chunks()))
        submitted = pa.concat_tables([before, submitted.filter(fresh)])
    catalog.write_atomic(path, parquet_bytes(submitted))


class ShardCommitter:
    """Checks, puts into `raw/` and commits the staged shards of one img2dataset call, each as
    soon as img2dataset has finished it (module docstring); records new and failed shards and
    successes in `result`, the failures by cause in `failures`, each shard's (start, end)
    download time in `spans`."""

    def __init__(self, catalog: Catalog, raw: str, staged: Path, table: UrlTable,
                 result: IngestResult, first_id: int, samples_per_shard: int) -> None:  # fmt: skip
        self.catalog, self.raw, self.staged, self.result = catalog, raw, staged, result
        self.notes = dict(zip(table.uid, table.note, strict=True))
        self.pending = {  # shard id -> the uids sent to it
            shard_name(first_id + i): table.uid[i * samples_per_shard : (i + 1) * samples_per_shard]
            for i in range(math.ceil(len(table) / samples_per_shard))
        }
        self.failures: Counter[str] = Counter()
        self.spans: list[tuple[float, float]] = []
        self.error: BaseException | None = None

    @contextlib.contextmanager
    def watching(self, every_s: float = POLL_S) -> Iterator[None]:
        """Commit finished shards from a thread while the body (img2dataset) runs. An error there
        (the store failing after its client's own retries) stops the committing, and is raised
        when the body ends: the shards committed so far stay, the next run downloads the rest."""
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(every_s):
                try:
                    self.poll()
                except Exception as err:  # noqa: BLE001 - raised in the caller's thread below
                    log.error("committing the finished shards failed: %s", err)
                    self.error = err
                    return

        thread = threading.Thread(target=loop, name="ingest-commit", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
        if self.error is not None:
            raise self.error

    def poll(self) -> None:
        """Commit (or quarantine) every pending shard whose stats file is complete."""
        for sid in sorted(self.pending):
            try:
                stats = json.loads((self.staged / f"{sid}_stats.json").read_text())
            except (FileNotFoundError, ValueError):  # not (completely) written yet
                continue
            self.commit(sid, stats)

    def finish(self) -> None:
        """After img2dataset: commit what it finished, fail the shards it did not."""
        self.poll()
        for sid in sorted(self.pending):
            self.commit(sid, None)
        self.result.new_shards.sort()
        self.result.failed_shards = dict(sorted(self.result.failed_shards.items()))

    def commit(self, sid: str, stats: dict[str, Any] | None) -> None:
        """Check one staged shard and commit it, or quarantine it (`stats` None: unfinished)."""
        expected = self.pending.pop(sid)
        try:
            if stats is None:
                raise ShardError(f"shard {sid}: img2dataset did not finish it (no complete "
                                 f"{sid}_stats.json)")  # fmt: skip
            self.spans.append((stats["start_time"], stats["end_time"]))
            info = inspect_shard(str(self.staged), sid)
            if sorted(info.uids) != sorted(expected):
                raise ShardError(
                    f"shard {sid}: its rows are not the {len(expected)} rows sent to it"
                )
        except (ShardError, KeyError, TypeError) as err:  # a stats file without times: the same
            self.result.failed_shards[sid] = str(err)
            self.failures["shard_failed"] += len(expected)
            quarantine_shard(self.catalog, self.staged, self.raw, sid)
            return
        caption_notes = Counter(self.notes[u] for u in info.uids if self.notes.get(u))
        record = DoneRecord(
            shard=sid,
            stage="raw",
            digest=info.digest,
            files=[f"{sid}.tar", f"{sid}.parquet"],
            rows=info.successes,
            failures=info.failures,
            extra={
                "samples": info.samples,
                "source": self.result.source_digest,
                "caption_notes": dict(caption_notes),
            },
        )
        commit_staged(self.catalog, self.staged, self.raw, record)
        self.result.new_shards.append(sid)
        self.result.successes += info.successes
        self.failures.update(info.failures)
        if info.successes == 0:
            self.result.failed_shards[sid] = (
                f"shard {sid}: none of its {info.samples} samples downloaded"
            )


def commit_staged(catalog: Catalog, staged: Path, directory: str, record: DoneRecord) -> None:
    """`Catalog.commit` of a shard whose files are still staged: their sizes and sha256 from the
    staged copies, then the files (and img2dataset's stats) put into `directory`, their stored
    sizes checked, then the completion record, last."""
    for name in record.files:
        record.file_sizes[name], record.file_sha256[name] = _size_and_sha256(staged / name)
    stats = f"{record.shard}_stats.json"
    for name in (*record.files, stats):  # the stats file stays staged for img2dataset's logger
        put_staged(catalog, staged / name, f"{directory}/{name}", keep=name == stats)
    stored = catalog.fs.get_file_info([f"{directory}/{name}" for name in record.files])
    for name, info in zip(record.files, stored, strict=True):
        if info.size != record.file_sizes[name]:
            raise OSError(f"{info.path} is {info.size} bytes after its upload, staged "
                          f"{record.file_sizes[name]}")  # fmt: skip
    catalog.write_atomic(catalog.done_path(directory, record.shard), record.to_json().encode())


def _size_and_sha256(path: Path) -> tuple[int, str]:
    h, size = hashlib.sha256(), 0
    with path.open("rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
            size += len(block)
    return size, h.hexdigest()


def parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()
