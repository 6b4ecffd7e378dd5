"""The raw corpus, `<root>/corpora/<corpus>/raw/`: shards, manifest, per-sample outcomes.

    NNNNN.tar, NNNNN.parquet, NNNNN_stats.json   one img2dataset webdataset shard (images, one
                                                 row per sample with its status, its stats)
    NNNNN.done.json                              its completion record (`Catalog.commit`), last
    manifest.json                                sources (URL lists, retries), shards, digest
    _sources/<list sha256[:16]>.parquet          every row ever submitted from a list (retries)
    _failed/                                     files of shards that could not be committed
    _staging/                                    only a killed run of an older seedpipe left this

Design choices:
- A shard is committed only when its tar and parquet agree (`inspect_shard`); its digest hashes
  its successful (key, image sha256) pairs, so the same images give the same digest whatever the
  download order, and the corpus digest is `catalog.dataset_digest` of the committed shards.
- Shard ids are never reused: an id whose shard failed stays taken (its files are in `_failed/`),
  so the manifest's record of it stays true.
- A committed shard that no longer passes the checks (its record unsound, a file missing or
  resized, its parquet unreadable: `raw_state`) is *lost*: reported, moved to `_failed/`, noted in
  the manifest's `lost_shards`; the next run of its list (or `--retry-failed`) downloads its rows
  again into a new shard, and nothing else is blocked.
- Failure causes (per sample, from img2dataset's `status`/`error_message`): `http_404`,
  `http_4xx`, `http_5xx`, `redirect_loop` (a loop or over 10 hops), `timeout` (one socket
  operation, or the whole URL past its deadline: `pipelines.fetch`), `too_large` (over the byte
  cap), `not_an_image` (no known image signature),
  `truncated_image` (an image signature, but the bytes do not decode), `decompression_bomb`,
  `blocked_address` (at connect time, `pipelines.netguard`), `robots_disallowed` (X-Robots-Tag
  noai/noindex, which img2dataset honours), `other_error:<short message>`. Only transient causes
  are retryable (timeout, 5xx, 408/425/429, connection errors); 404, other 4xx, redirect loops,
  too large, not an image, truncated and bombs are permanent.
- Every read and write of `raw/` goes through the catalog's filesystem (`Catalog.fs`: a local
  path or an object store). img2dataset's output is staged on this node's scratch
  (`pipelines.rawcommit`) and only a checked shard's files reach `raw/` (`put_staged`).
"""

from __future__ import annotations

import json
import re
import shutil
import tarfile
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.catalog import DONE_SUFFIX, Catalog, dataset_digest, sha256_text
from pipelines.storage import upload

ENCODE_FORMAT = "jpg"
MANIFEST = "manifest.json"
STAGING = "_staging"
SOURCES = "_sources"
FAILED = "_failed"
RETRYABLE_HTTP = {408, 425, 429}

_HTTP = re.compile(r"HTTP Error (\d{3})")


# ---- per-sample outcomes -----------------------------------------------------------------------
def failure_cause(status: str | None, error_message: str | None) -> str | None:
    """The cause of a failed img2dataset sample (None for a success)."""
    if status == "success":
        return None
    msg = (error_message or "").strip()
    low = msg.lower()
    if "redirect error that would lead to an infinite loop" in low:  # urllib's loop / 10-hop limit
        return "redirect_loop"
    if m := _HTTP.search(msg):
        code = int(m.group(1))
        if code == 404:
            return "http_404"
        return "http_5xx" if code >= 500 else "http_4xx"
    if "blocked address" in low:
        return "blocked_address"
    if "timed out" in low or "timeout" in low:
        return "timeout"
    if low.startswith("too large"):
        return "too_large"
    if low.startswith("not an image"):
        return "not_an_image"
    if "decompression bomb" in low or "cv_io_max_image_pixels" in low:
        return "decompression_bomb"
    if low.startswith("truncated or corrupt") or low == "image decoding error":
        return "truncated_image"
    if "x-robots-tag" in low:
        return "robots_disallowed"
    short = re.sub(r"^<urlopen error (.*)>$", r"\1", msg)
    short = re.sub(r"\[Errno -?\d+\]\s*", "", short).strip().lower()
    return f"other_error:{short[:60] or status or 'unknown'}"


def is_retryable(status: str | None, error_message: str | None) -> bool:
    """Whether a failed sample may succeed on a later attempt (transient causes only)."""
    cause = failure_cause(status, error_message)
    if cause is None:
        return False
    if cause == "redirect_loop":
        return False
    if m := _HTTP.search(error_message or ""):
        return int(m.group(1)) in RETRYABLE_HTTP or int(m.group(1)) >= 500
    return cause == "timeout" or cause.startswith("other_error:")


def sample_outcomes(
    catalog: Catalog,
    raw: str,
    records: dict[str, Any] | None = None,
    lost: dict[str, str] | None = None,
) -> tuple[set[str], dict[str, tuple[str, str]]]:
    """uids downloaded successfully in committed shards, and each other uid's latest failure
    as (status, error_message). With `lost`, a shard whose parquet cannot be read is added to it
    (and skipped) instead of raising."""
    success: set[str] = set()
    latest: dict[str, tuple[str, str]] = {}
    records = catalog.committed(raw) if records is None else records
    for sid in sorted(records):
        if f"{sid}.parquet" not in records[sid].files:
            continue  # a shard made without img2dataset (tests' fixtures): no per-sample rows
        try:
            t = pq.read_table(f"{raw}/{sid}.parquet", columns=["uid", "status", "error_message"],
                              filesystem=catalog.fs)  # fmt: skip
        except Exception as err:  # noqa: BLE001 - unreadable for whatever reason: the same loss
            if lost is None:
                raise
            lost[sid] = f"{sid}.parquet is unreadable ({str(err)[:200]})"
            continue
        for uid, status, msg in zip(
            *(t.column(c).to_pylist() for c in ("uid", "status", "error_message"))
        ):
            if status == "success":
                success.add(uid)
                latest.pop(uid, None)
            elif uid not in success:
                latest[uid] = (status, msg)
    return success, latest


@dataclass
class RawState:
    """The raw corpus as ingest finds it: sound shards, lost shards, per-sample outcomes."""

    records: dict[str, Any]
    lost: dict[str, str]
    """Committed shards that cannot be trusted (`Catalog.scan`) or read -> why."""
    success: set[str]
    latest: dict[str, tuple[str, str]]


def raw_state(catalog: Catalog, raw: str) -> RawState:
    """Check every committed raw shard (record, file sizes, parquet) and read the outcomes of
    the sound ones."""
    scan = catalog.scan(raw)
    lost = dict(scan.problems)
    success, latest = sample_outcomes(catalog, raw, scan.records, lost)
    records = {sid: r for sid, r in scan.records.items() if sid not in lost}
    return RawState(records=records, lost=lost, success=success, latest=latest)


def quarantine_lost(
    catalog: Catalog, raw: str, manifest: dict[str, Any], lost: dict[str, str]
) -> None:
    """Move the files of lost shards (record included) to raw/_failed/ and note them in the
    manifest's `lost_shards` (ids stay taken; their rows are downloaded again by the next run of
    their list, or by --retry-failed)."""
    if not lost:
        return
    catalog.fs.create_dir(f"{raw}/{FAILED}", recursive=True)
    for path in catalog.list_files(raw):
        name = path.rsplit("/", 1)[-1]
        if _shard_id_of(name) in lost:
            catalog.fs.move(path, f"{raw}/{FAILED}/{name}")
    notes = manifest.setdefault("lost_shards", {})
    for sid, why in lost.items():
        source = manifest["shards"].get(sid, {}).get("source")
        notes[sid] = {"reason": why, "source": source, "rebuilt": False}
    write_manifest(catalog, raw, manifest)


# ---- shards --------------------------------------------------------------------------------------
def shard_name(i: int) -> str:
    return f"{i:05d}"


def raw_shard_digest(pairs: Iterable[tuple[str, str]]) -> str:
    """A raw shard's digest: the hash of its successful (key, image sha256) pairs, sorted."""
    return sha256_text(*(f"{k}:{h}" for k, h in sorted(pairs)))


class ShardError(Exception):
    """A downloaded shard that cannot be committed (missing or unreadable tar/parquet)."""


@dataclass
class ShardInfo:
    """What `inspect_shard` found in a downloaded shard."""

    shard: str
    samples: int
    successes: int
    digest: str
    failures: dict[str, int]
    """Failed samples by cause."""
    uids: list[str]
    """The URL-list row of every sample, in shard order."""


def inspect_shard(directory: str, shard: str) -> ShardInfo:
    """Read a downloaded shard's parquet and tar, check that they agree, and digest it."""
    parquet, tar = Path(directory, f"{shard}.parquet"), Path(directory, f"{shard}.tar")
    if not parquet.exists():
        raise ShardError(f"shard {shard}: {parquet.name} is missing")
    if not tar.exists():
        raise ShardError(f"shard {shard}: {tar.name} is missing")
    try:
        cols = pq.read_table(parquet, columns=["key", "uid", "status", "error_message", "sha256"])
    except Exception as err:  # noqa: BLE001 - any unreadable parquet is the same failure
        raise ShardError(f"shard {shard}: {parquet.name} is unreadable ({err})") from err
    rows = cols.to_pylist()
    ok = [r for r in rows if r["status"] == "success"]
    try:
        with tarfile.open(tar, "r:") as tf:
            tar_keys = {
                m.name.rsplit(".", 1)[0]
                for m in tf.getmembers()
                if m.name.endswith(f".{ENCODE_FORMAT}")
            }
    except (tarfile.TarError, OSError, EOFError) as err:
        raise ShardError(f"shard {shard}: {tar.name} is unreadable ({err})") from err
    if tar_keys != {r["key"] for r in ok}:
        raise ShardError(
            f"shard {shard}: {tar.name} holds {len(tar_keys)} images but {parquet.name} lists {len(ok)} successes"
        )
    failures = Counter(
        failure_cause(r["status"], r["error_message"]) for r in rows if r["status"] != "success"
    )
    return ShardInfo(
        shard=shard,
        samples=len(rows),
        successes=len(ok),
        digest=raw_shard_digest((r["key"], r["sha256"]) for r in ok),
        failures=dict(sorted(failures.items())),  # type: ignore[arg-type]
        uids=[r["uid"] for r in rows],
    )


def put_staged(catalog: Catalog, local: Path, path: str, *, keep: bool = False) -> None:
    """Put a node-local staged file at `path` on the catalog's filesystem: a rename on a local root
    (a copy across devices), one whole-object put on an object store. The local file is removed
    unless `keep`. The caller commits what it put (a completion record), so a file half-copied
    by a killed run is never read, and the next run sweeps it."""
    if isinstance(catalog.fs, pafs.LocalFileSystem):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        (shutil.copyfile if keep else shutil.move)(local, path)
    else:
        upload(local, catalog.fs, path)
        if not keep:
            local.unlink()


def quarantine_shard(catalog: Catalog, staged: Path, raw: str, sid: str) -> None:
    """Put what exists of a failed staged shard in raw/_failed/ for inspection (never read as
    data); its stats file stays staged (img2dataset's logger reads it)."""
    for name in (f"{sid}.tar", f"{sid}.parquet", f"{sid}_stats.json"):
        if (staged / name).is_file():
            put_staged(catalog, staged / name, f"{raw}/{FAILED}/{name}",
                       keep=name.endswith("_stats.json"))  # fmt: skip


def _shard_id_of(name: str) -> str | None:
    m = re.match(r"^(\d{5,})[._]", name)
    return m.group(1) if m else None


def sweep_leftovers(catalog: Catalog, raw: str) -> None:
    """Delete what a killed run left: tmp files, data files of uncommitted shards (and the
    `_staging/` folder of an older seedpipe, which staged inside the root)."""
    fs = catalog.fs
    staging = f"{raw}/{STAGING}"
    if catalog.exists(staging):
        fs.delete_dir(staging)
    records = catalog.committed(raw)
    leftovers = set()
    for path in catalog.list_files(raw):
        name = path.rsplit("/", 1)[-1]
        sid = _shard_id_of(name)
        if sid and sid not in records and not name.endswith(DONE_SUFFIX):
            leftovers.add(sid)
    catalog.sweep_uncommitted(raw, shards=leftovers)
    for path in catalog.list_files(raw):  # sweep_uncommitted does not know NNNNN_stats.json
        name = path.rsplit("/", 1)[-1]
        if name.endswith("_stats.json") and _shard_id_of(name) not in records:
            fs.delete_file(path)


def next_shard_id(catalog: Catalog, raw: str) -> int:
    """The first shard id after every committed shard and every shard that ever failed."""
    used = [int(s) for s in catalog.committed(raw)]
    manifest = read_manifest(catalog, raw)
    used += [int(s) for s in manifest.get("lost_shards", {})]
    for src in manifest["sources"].values():
        used += [int(s) for s in src.get("failed_shards", {})]
    # a run killed before its manifest was written may have set shards aside already
    set_aside = (_shard_id_of(p.rsplit("/", 1)[-1]) for p in catalog.list_files(f"{raw}/{FAILED}"))
    used += [int(s) for s in set_aside if s]
    return max(used, default=-1) + 1


# ---- manifest ------------------------------------------------------------------------------------
def read_manifest(catalog: Catalog, raw: str) -> dict[str, Any]:
    path = f"{raw}/{MANIFEST}"
    if not catalog.exists(path):
        return {"format": 1, "shards": {}, "sources": {}}
    try:
        manifest = json.loads(catalog.read_text(path))
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not readable JSON ({err}): restore or remove it") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("sources"), dict):
        raise ValueError(f"{path} is not a seedpipe raw manifest: restore or remove it")
    manifest.setdefault("shards", {})
    return manifest


def write_manifest(catalog: Catalog, raw: str, manifest: dict[str, Any]) -> None:
    """Write `manifest` with its shards and dataset digest refreshed from the completion records."""
    records = catalog.committed(raw)
    manifest["shards"] = {
        sid: {
            "samples": r.extra.get("samples", 0),
            "successes": r.rows,
            "digest": r.digest,
            "source": r.extra.get("source", ""),
        }
        for sid, r in sorted(records.items())
    }
    manifest["dataset_digest"] = catalog_digest(catalog, raw)
    manifest["updated_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    catalog.write_atomic(
        f"{raw}/{MANIFEST}", json.dumps(manifest, indent=1, sort_keys=True).encode()
    )


def catalog_digest(catalog: Catalog, raw: str) -> str:
    """The raw corpus's dataset digest: `catalog.dataset_digest` of its committed shards."""
    return dataset_digest({sid: r.digest for sid, r in catalog.committed(raw).items()})
