"""Ingest's second half: img2dataset's staging output -> verified, committed raw shards + manifest.

A shard whose tar or parquet is missing, unreadable or inconsistent is not committed: every one
of its samples counts `shard_failed` and its files go to `raw/_failed/`. A shard with no successful
sample is committed (its parquet keeps the per-sample errors) but also counts as failed.
"""

from __future__ import annotations

import json
import math
from collections import Counter
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
    STAGING,
    ShardError,
    inspect_shard,
    next_shard_id,
    quarantine_shard,
    shard_name,
    sweep_leftovers,
    write_manifest,
)
from pipelines.urllists import UrlTable

if TYPE_CHECKING:
    from pipelines.ingest import IngestConfig, IngestResult


def download_and_commit(
    catalog: Catalog,
    raw: str,
    table: UrlTable,
    result: IngestResult,
    manifest: dict[str, Any],
    *,
    kind: str,
    origins: list[str],
    settings: dict[str, Any],
    config: IngestConfig,
) -> None:
    """Download `table` into new shards, commit the good ones, update `result` and the manifest."""
    catalog.fs.create_dir(raw, recursive=True)
    sweep_leftovers(catalog, raw)
    first_id = next_shard_id(catalog, raw)
    staging = f"{raw}/{STAGING}"
    out_dir = f"{staging}/out"
    catalog.fs.create_dir(out_dir, recursive=True)
    if kind == "list":  # every row ever submitted from this list, for --retry-failed
        record_submitted(catalog, f"{raw}/{SOURCES}/{result.source_digest[:16]}.parquet", table)
    input_path = f"{staging}/input.parquet"
    catalog.write_atomic(
        input_path, parquet_bytes(table.to_arrow().select(["url", "caption", "uid"]))
    )
    result.wall_s = run_img2dataset(input_path, out_dir, first_id=first_id, config=config)

    source = {
        "kind": kind, "uri": config.url_list or catalog.uri(raw), "rows": result.rows_in,
        "submitted": len(table), "allow_private_hosts": config.allow_private_hosts,
        "origins": origins, "planning": result.planning, "shards": [], "failed_shards": {},
        "ingested_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }  # fmt: skip
    failures, spans = commit_shards(
        catalog, raw, out_dir, table, result, first_id, config.samples_per_shard
    )
    catalog.fs.delete_dir(staging)

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
        before = pq.read_table(path)
        fresh = pc.invert(pc.is_in(submitted["uid"], value_set=before["uid"].combine_chunks()))
        submitted = pa.concat_tables([before, submitted.filter(fresh)])
    catalog.write_atomic(path, parquet_bytes(submitted))


def commit_shards(
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


def parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()
