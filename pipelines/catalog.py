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
- Nothing on shared storage is trusted because it is there (`scan`): a completion record that is
  not valid JSON, has unknown keys, names a shard that is not an id (`SHARD_ID`) or a file that is
  not a bare name of that shard (`00001.parquet`, never `../x` or another shard's file), or whose
  files are missing or not the recorded size, is not committed; `scan` reports it and planning
  rebuilds that shard (an output) or reports it unbuildable (an input). Records hold each file's
  size and sha256 (`commit` computes them); `open_verified` checks the hash while a file is read.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

DONE_SUFFIX = ".done.json"
TMP_MARK = ".tmp-"
SHARD_ID = re.compile(r"^\d{5,}$")
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class RecordError(ValueError):
    """A completion record that cannot be trusted (unreadable, malformed, or unsafe names)."""


class IntegrityError(ValueError):
    """A committed file whose bytes are not the ones its completion record describes."""


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
    """Data files of the shard: bare names in its dataset folder, each `<shard>.<suffix>`."""
    rows: int
    """Rows in `files` (raw: successful samples)."""
    input_digest: str = ""
    config_digest: str = ""
    model_digest: str = ""
    failures: dict[str, int] = field(default_factory=dict)
    """Counted, reported skips by cause (raw: download failures; derived: decode errors...)."""
    extra: dict[str, Any] = field(default_factory=dict)
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    file_sizes: dict[str, int] = field(default_factory=dict)
    """Bytes of each file at commit (`Catalog.commit`); planning checks them."""
    file_sha256: dict[str, str] = field(default_factory=dict)
    """sha256 of each file at commit; `Catalog.open_verified` checks it while reading."""

    def __post_init__(self) -> None:
        if not isinstance(self.shard, str) or not SHARD_ID.match(self.shard):
            raise RecordError(f"shard {self.shard!r} is not a shard id (5+ digits)")
        if not isinstance(self.files, list) or not all(isinstance(n, str) for n in self.files):
            raise RecordError(f"shard {self.shard}: files must be a list of names")
        for name in self.files:
            if (
                ".." in name
                or not _FILE_NAME.fullmatch(name)
                or not name.startswith(f"{self.shard}.")
            ):
                raise RecordError(f"shard {self.shard}: file {name!r} is not a file of this shard")
        for key, kind in (("stage", str), ("digest", str), ("rows", int), ("failures", dict),
                          ("extra", dict), ("file_sizes", dict), ("file_sha256", dict)):  # fmt: skip
            if not isinstance(getattr(self, key), kind):
                raise RecordError(f"shard {self.shard}: {key} must be a {kind.__name__}")

    @classmethod
    def from_json(cls, text: str) -> DoneRecord:
        """Parse and check a record; RecordError for anything that is not a sound record."""
        try:
            obj = json.loads(text)
            if not isinstance(obj, dict):
                raise RecordError("not a JSON object")
            return cls(**obj)
        except RecordError:
            raise
        except (ValueError, TypeError) as err:  # bad JSON, unknown or missing keys
            raise RecordError(f"unreadable completion record ({err})") from None

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
    """Input shards that cannot be built (a damaged input record or file) -> reason."""
    damaged: dict[str, str] = field(default_factory=dict)
    """Output shards whose record or files failed the checks -> reason (rebuilt, as stale)."""

    @property
    def to_build(self) -> list[str]:
        return sorted(self.missing + self.stale)

    def summary(self) -> str:
        text = (
            f"{len(self.to_build)} to build, {len(self.up_to_date)} up to date, "
            f"{len(self.stale)} stale, {len(self.orphaned)} orphaned"
        )
        text += f", {len(self.blocked)} unbuildable" if self.blocked else ""
        return text + (f", {len(self.damaged)} damaged (rebuilt)" if self.damaged else "")

    def problems(self, limit: int = 10) -> list[str]:
        """One line per unbuildable input and damaged output shard, with why (printed with the
        summary)."""
        why = [f"  unbuildable input {s}: {r}" for s, r in sorted(self.blocked.items())]
        why += [f"  damaged output {s}: {r}" for s, r in sorted(self.damaged.items())]
        return why[:limit] + ([f"  ... and {len(why) - limit} more"] if len(why) > limit else [])


def plan_shards(wanted: Mapping[str, str], existing: Mapping[str, DoneRecord], *,
                damaged: Mapping[str, str] | None = None, blocked: Mapping[str, str] | None = None) -> Plan:  # fmt: skip
    """Compare wanted {shard: digest it should have} with the committed records.

    `damaged`: output shards whose record or files failed the checks (`Catalog.scan`): rebuilt
    as stale when wanted. `blocked`: input shards that failed them: not built, reported.
    """
    plan = Plan(blocked=dict(blocked or {}), damaged=dict(damaged or {}))
    for sid in sorted(wanted):
        record = existing.get(sid)
        if record is None:
            (plan.stale if sid in plan.damaged else plan.missing).append(sid)
        elif record.digest != wanted[sid]:
            plan.stale.append(sid)
        else:
            plan.up_to_date.append(sid)
    plan.orphaned = sorted(set(existing) - set(wanted) - set(plan.blocked))
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

    def location(self, path: str) -> str:
        """A path inside the catalog as readers outside this object take it (pyarrow's and Ray
        Data's readers, a worker on another node): the path on a local root, the store URI
        (`s3://bucket/...`) on an object-store root."""
        return path if isinstance(self.fs, pafs.LocalFileSystem) else self.uri(path)

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
        """Write to a temporary sibling, then rename into place (readers never see half a file).
        On an object store one put of the whole object is atomic already (a reader gets the old
        object or the new one), and a "rename" there is a copy and a delete that briefly shows
        the temporary key: the object is put at its name."""
        self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        if not isinstance(self.fs, pafs.LocalFileSystem):
            with self.fs.open_output_stream(path) as f:
                f.write(data)
            return
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
        """Write a shard's completion record, after its data files are in place; the record gets
        each file's size and sha256."""
        for name in record.files:
            path = f"{directory}/{name}"
            if not self.exists(path):
                raise FileNotFoundError(f"cannot commit shard {record.shard}: {path} is missing")
            record.file_sizes[name], record.file_sha256[name] = self._size_and_sha256(path)
        self.write_atomic(self.done_path(directory, record.shard), record.to_json().encode())

    def _size_and_sha256(self, path: str) -> tuple[int, str]:
        h, size = hashlib.sha256(), 0
        with self.fs.open_input_stream(path) as f:
            while block := f.read(1 << 22):
                h.update(block)
                size += len(block)
        return size, h.hexdigest()

    def scan(self, directory: str) -> Scan:
        """The committed shards of a dataset folder that pass the checks (module docstring), and
        every other completion record with the reason it is not trusted."""
        infos = self.fs.get_file_info(pafs.FileSelector(directory, allow_not_found=True))
        sizes = {i.path.rsplit("/", 1)[-1]: i.size for i in infos if i.type == pafs.FileType.File}
        scan = Scan()
        for name in sorted(sizes):
            if not name.endswith(DONE_SUFFIX) or TMP_MARK in name:
                continue
            sid = name.removesuffix(DONE_SUFFIX)
            try:
                record = DoneRecord.from_json(self.read_text(f"{directory}/{name}"))
                if record.shard != sid:
                    raise RecordError(f"{name} describes shard {record.shard!r}")
            except (RecordError, UnicodeDecodeError) as err:
                scan.problems[sid] = f"{name} is not a sound completion record: {err}"
                continue
            if problem := _file_problem(record, sizes):
                scan.problems[sid] = problem
            else:
                scan.records[sid] = record
        return scan

    def committed(self, directory: str) -> dict[str, DoneRecord]:
        """{shard: record} of every committed shard in a dataset folder that passes the checks."""
        return self.scan(directory).records

    def read_record(self, directory: str, shard: str) -> DoneRecord:
        """One shard's completion record, checked (RecordError if it is not sound)."""
        record = DoneRecord.from_json(self.read_text(self.done_path(directory, shard)))
        if record.shard != shard:
            raise RecordError(
                f"{self.done_path(directory, shard)} describes shard {record.shard!r}"
            )
        return record

    @contextmanager
    def open_verified(self, directory: str, shard: str, name: str) -> Iterator[VerifiedReader]:
        """Open a committed file for streaming; `verify()` (after the last read) raises
        IntegrityError unless its bytes are the ones the shard's record describes."""
        record = self.read_record(directory, shard)
        if name not in record.files:
            raise RecordError(f"shard {shard}: {name} is not one of its files")
        with self.fs.open_input_stream(f"{directory}/{name}") as f:
            yield VerifiedReader(f, f"{directory}/{name}", record.file_sha256.get(name),
                                 record.file_sizes.get(name))  # fmt: skip

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
        """Remove a shard's record and files (before rebuilding a stale or damaged shard). Only
        the files of a sound record are deleted (their names are checked bare names of the
        shard); an unsound record file is just removed."""
        done = self.done_path(directory, shard)
        if not self.exists(done):
            return
        try:
            names = self.read_record(directory, shard).files
        except (RecordError, UnicodeDecodeError):
            names = []
        self.fs.delete_file(done)
        for name in names:
            if self.exists(f"{directory}/{name}"):
                self.fs.delete_file(f"{directory}/{name}")


@dataclass
class Scan:
    """What `Catalog.scan` found in a dataset folder."""

    records: dict[str, DoneRecord] = field(default_factory=dict)
    """Committed shards that pass the checks."""
    problems: dict[str, str] = field(default_factory=dict)
    """Shards with a completion record that does not -> why."""


def _file_problem(record: DoneRecord, sizes: Mapping[str, int]) -> str | None:
    for name in record.files:
        if name not in sizes:
            return f"{name} is missing"
        if name in record.file_sizes and sizes[name] != record.file_sizes[name]:
            return f"{name} is {sizes[name]} bytes, its record says {record.file_sizes[name]}"
    return None


class VerifiedReader:
    """A read-only stream that hashes what is read; `verify()` reads the rest and compares."""

    def __init__(self, stream: Any, path: str, sha256: str | None, size: int | None) -> None:
        self._stream, self.path, self._want, self._size = stream, path, sha256, size
        self._hash, self.bytes_read = hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        data = self._stream.read() if n is None or n < 0 else self._stream.read(n)
        self._hash.update(data)
        self.bytes_read += len(data)
        return data

    def readable(self) -> bool:
        return True

    def verify(self) -> None:
        while self.read(1 << 22):
            pass
        if self._size is not None and self.bytes_read != self._size:
            raise IntegrityError(
                f"{self.path} is {self.bytes_read} bytes, its record says {self._size}"
            )
        if self._want is not None and self._hash.hexdigest() != self._want:
            raise IntegrityError(f"{self.path} changed since it was committed (sha256 differs)")
