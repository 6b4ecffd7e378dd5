"""The catalog: where every dataset lives, what is complete, and what a stage still has to build.

Layout (DESIGN.md) under one root URI (local path or any pyarrow/fsspec filesystem URI):

    <root>/corpora/<corpus>/raw/                     img2dataset shards NNNNN.tar/.parquet/_stats.json
    <root>/corpora/<corpus>/<stage>/<name>/          derived shards (stage: features, qembeds, tokens)

Rules this module enforces:
- A shard is the unit of work and keeps its input shard's id. Its data files are written under a
  temporary name and renamed into place; its *completion record* `NNNNN.done.json` is written
  last. Readers only read files named by a completion record, so a killed writer leaves nothing
  that anyone reads; `sweep_uncommitted` deletes its leftovers.
- Digests, not timestamps. A raw shard's digest hashes its successful (key, sha256) pairs. A
  derived shard's digest hashes (input shard digest, stage config digest, model digest); a shard
  whose recorded digest differs from the one it would have now is stale.
- Planning compares what exists with what should: `N to build, M up to date, K stale, J orphaned`.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

DONE_SUFFIX = ".done.json"
TMP_MARK = ".tmp-"
SHARD_ID = re.compile(r"^\d{5,}$")
STAGES = ("features", "qembeds", "tokens")


def sha256_text(*parts: str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode())
        h.update(b"\x00")
    return h.hexdigest()


def digest_of(obj: Any) -> str:
    """sha256 of an object's canonical JSON (configs, row-key lists)."""
    return sha256_text(json.dumps(obj, sort_keys=True, default=str))


def derived_shard_digest(input_digest: str, config_digest: str, model_digest: str) -> str:
    return sha256_text(input_digest, config_digest, model_digest)


def dataset_digest(shard_digests: Mapping[str, str]) -> str:
    """A dataset's identity in MLflow: the hash of its shards' (id, digest) pairs."""
    return sha256_text(*(f"{sid}={d}" for sid, d in sorted(shard_digests.items())))


@dataclass(kw_only=True)
class DoneRecord:
    """The completion record of one shard: written last, the only thing readers trust."""

    shard: str
    stage: str
    digest: str
    """raw: content digest; derived: derived_shard_digest(input, config, model)."""
    files: list[str]
    """Data files of the shard, relative to its dataset folder."""
    rows: int
    """Rows in `files` (raw: successful samples)."""
    input_digest: str = ""
    config_digest: str = ""
    model_digest: str = ""
    failures: dict[str, int] = field(default_factory=dict)
    """Counted, reported skips by cause (raw: download failures; derived: decode errors...)."""
    extra: dict[str, Any] = field(default_factory=dict)
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    @classmethod
    def from_json(cls, text: str) -> DoneRecord:
        return cls(**json.loads(text))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)


@dataclass
class Plan:
    """What a stage will do. `to_build` = missing + stale, in shard order."""

    missing: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)
    up_to_date: list[str] = field(default_factory=list)
    orphaned: list[str] = field(default_factory=list)
    blocked: dict[str, str] = field(default_factory=dict)
    """Input shards that cannot be built (e.g. a corrupt raw shard) -> reason."""

    @property
    def to_build(self) -> list[str]:
        return sorted(self.missing + self.stale)

    def summary(self) -> str:
        text = (
            f"{len(self.to_build)} to build, {len(self.up_to_date)} up to date, "
            f"{len(self.stale)} stale, {len(self.orphaned)} orphaned"
        )
        return text + (f", {len(self.blocked)} unbuildable" if self.blocked else "")


def plan_shards(wanted: Mapping[str, str], existing: Mapping[str, DoneRecord]) -> Plan:
    """Compare wanted {shard: digest it should have} with the committed records."""
    plan = Plan()
    for sid in sorted(wanted):
        record = existing.get(sid)
        if record is None:
            plan.missing.append(sid)
        elif record.digest != wanted[sid]:
            plan.stale.append(sid)
        else:
            plan.up_to_date.append(sid)
    plan.orphaned = sorted(set(existing) - set(wanted))
    return plan


class Catalog:
    """Paths and committed state under one root (local path or filesystem URI)."""

    def __init__(self, root: str | Path) -> None:
        root = str(root)
        if "://" in root:
            self.fs, base = pafs.FileSystem.from_uri(root)
        else:
            self.fs, base = pafs.LocalFileSystem(), str(Path(root).expanduser().resolve())
        self.root_uri = root
        self.base = base.rstrip("/")

    # ---- layout --------------------------------------------------------------------------
    def corpus_dir(self, corpus: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", corpus):
            raise ValueError(f"corpus name {corpus!r}: use letters, digits, '.', '_' and '-'")
        return f"{self.base}/corpora/{corpus}"

    def raw_dir(self, corpus: str) -> str:
        return f"{self.corpus_dir(corpus)}/raw"

    def stage_dir(self, corpus: str, stage: str, name: str) -> str:
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._@=+-]*", name):
            raise ValueError(f"{stage} dataset name {name!r}: use letters, digits and . _ @ = + -")
        return f"{self.corpus_dir(corpus)}/{stage}/{name}"

    def uri(self, path: str) -> str:
        """A path inside the catalog as a URI for MLflow / Ray (file:// for local roots)."""
        return (
            f"file://{path}"
            if isinstance(self.fs, pafs.LocalFileSystem)
            else f"{self.root_uri.split('://')[0]}://{path}"
        )

    # ---- files ---------------------------------------------------------------------------
    def exists(self, path: str) -> bool:
        return self.fs.get_file_info(path).type != pafs.FileType.NotFound

    def list_files(self, directory: str) -> list[str]:
        info = self.fs.get_file_info(pafs.FileSelector(directory, allow_not_found=True))
        return sorted(i.path for i in info if i.type == pafs.FileType.File)

    def read_text(self, path: str) -> str:
        with self.fs.open_input_stream(path) as f:
            return f.read().decode()

    def write_atomic(self, path: str, data: bytes) -> None:
        """Write to a temporary sibling, then rename into place (readers never see half a file)."""
        self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        tmp = f"{path}{TMP_MARK}{uuid.uuid4().hex[:8]}"
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        self.fs.move(tmp, path)

    def temp_path(self, path: str) -> str:
        """A temporary name for `path`; commit it with `self.fs.move(tmp, path)`."""
        return f"{path}{TMP_MARK}{uuid.uuid4().hex[:8]}"

    # ---- completion records ----------------------------------------------------------------
    def done_path(self, directory: str, shard: str) -> str:
        return f"{directory}/{shard}{DONE_SUFFIX}"

    def commit(self, directory: str, record: DoneRecord) -> None:
        """Write a shard's completion record, after its data files are in place."""
        for name in record.files:
            if not self.exists(f"{directory}/{name}"):
                raise FileNotFoundError(
                    f"cannot commit shard {record.shard}: {directory}/{name} is missing"
                )
        self.write_atomic(self.done_path(directory, record.shard), record.to_json().encode())

    def committed(self, directory: str) -> dict[str, DoneRecord]:
        """{shard: record} of every committed shard in a dataset folder."""
        records = {}
        for path in self.list_files(directory):
            name = path.rsplit("/", 1)[-1]
            if name.endswith(DONE_SUFFIX) and TMP_MARK not in name:
                record = DoneRecord.from_json(self.read_text(path))
                records[record.shard] = record
        return records

    def committed_files(self, directory: str, shards: Iterable[str] | None = None) -> list[str]:
        """Full paths of the data files of committed shards (all, or those in `shards`)."""
        records = self.committed(directory)
        keep = records.keys() if shards is None else set(shards) & records.keys()
        return [f"{directory}/{name}" for sid in sorted(keep) for name in records[sid].files]

    def sweep_uncommitted(self, directory: str, *, shards: Iterable[str]) -> list[str]:
        """Delete temporary files and data files of `shards` that no completion record names.

        Call it for the shards about to be (re)built, before building them: whatever a killed run
        left of them is garbage. Returns the deleted paths.
        """
        shards = set(shards)
        named = {name for r in self.committed(directory).values() for name in r.files}
        deleted = []
        for path in self.list_files(directory):
            name = path.rsplit("/", 1)[-1]
            shard = name.split(".", 1)[0].split("-", 1)[0]
            if name.endswith(DONE_SUFFIX) and TMP_MARK not in name:
                continue
            if TMP_MARK in name or (shard in shards and name not in named):
                self.fs.delete_file(path)
                deleted.append(path)
        return deleted

    def uncommit(self, directory: str, shard: str) -> None:
        """Remove a shard's record and files (before rebuilding a stale shard)."""
        record = self.committed(directory).get(shard)
        if record is None:
            return
        self.fs.delete_file(self.done_path(directory, shard))
        for name in record.files:
            if self.exists(f"{directory}/{name}"):
                self.fs.delete_file(f"{directory}/{name}")
