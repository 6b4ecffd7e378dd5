"""URL lists: read a tsv/csv/parquet/jsonl list (`.gz` too) into one clean table `url, caption, uid`.

Layouts (`preset` sets the columns; otherwise a header row is detected: a first row in which no
cell contains "://" is a header):
- `cc3m`: Google's Conceptual Captions `Train_GCC-training.tsv` / `Validation_GCC-1.1.0-Validation.tsv`:
  TSV, no header, `caption<TAB>url`.
- `cc12m`: `cc12m.tsv`: TSV, no header, `url<TAB>caption`.
- with a header: the URL column is `url_col` or the first of url, image_url, img_url, link
  (any case); the caption column is `caption_col` or the first of caption, text, alt, alt_text,
  description. Parquet and jsonl always name their columns (LAION's `URL`/`TEXT` work as is).
- without a header: a 2-column file is (url, caption) in whichever order its first row shows;
  wider files need `url_col`/`caption_col` as 0-based column indices.

Design choices:
- A URL list is untrusted, often web-scraped input: reading it never raises on a row. A row
  without a usable http(s) URL, or with the wrong number of columns, is counted `malformed_row`
  and dropped; an empty caption is kept and counted `empty_caption`; a caption over
  `CAPTION_MAX_CHARS` is cut and counted `caption_truncated` (these two are the row's *note*,
  kept with it up to the shard's completion record); a repeated row is kept once and counted
  `duplicate_row`. Only a list that cannot be read at all (unknown format, no URL column) raises
  `ValueError`.
- `uid` = first 16 hex of sha256(url + "\\n" + caption), of the normalized row: it links every
  downloaded sample back to its row (img2dataset keeps it through `save_additional_columns`) and
  tells an incremental run which rows an earlier run downloaded, so it must never change.
- The published TSVs hold unescaped quotes in captions, so TSV is read with `QUOTE_NONE`; text is
  decoded with `errors="replace"` rather than failing a whole list on one bad byte.
- A list is identified by the sha256 of its file bytes (`file_sha256`), not by its path.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import itertools
import json
import re
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.parquet as pq

CAPTION_MAX_CHARS = 1000
MAX_URL_CHARS = 4096
PRESETS: dict[str, tuple[str, ...]] = {"cc3m": ("caption", "url"), "cc12m": ("url", "caption")}
URL_NAMES = ("url", "image_url", "img_url", "link")
CAPTION_NAMES = ("caption", "text", "alt", "alt_text", "description")
FORMATS = ("tsv", "csv", "parquet", "jsonl")
COLUMNS = ("url", "caption", "uid", "note")
"""The columns of a normalized table (`UrlTable.to_arrow`)."""

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def row_uid(url: str, caption: str) -> str:
    """The stable id of a URL-list row."""
    return hashlib.sha256(f"{url}\n{caption}".encode()).hexdigest()[:16]


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes: a URL list's identity."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def normalize_url(value: Any) -> str | None:
    """A usable http(s) URL (spaces percent-encoded), or None for a malformed one."""
    if not isinstance(value, str):
        return None
    url = value.strip()
    if not url or len(url) > MAX_URL_CHARS or _CONTROL.search(url):
        return None
    url = url.replace(" ", "%20")
    try:
        parts = urlsplit(url)
        _ = parts.port
    except ValueError:
        return None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        return None
    return url


def list_format(path: str | Path) -> str:
    """The format of a URL list from its file name: tsv, csv, parquet or jsonl (`.gz` ignored)."""
    name = str(path).lower().removesuffix(".gz")
    for fmt in FORMATS:
        if name.endswith(f".{fmt}"):
            return fmt
    if name.endswith(".ndjson"):
        return "jsonl"
    raise ValueError(
        f"url_list {path}: cannot tell its format; name it .tsv, .csv, .parquet or .jsonl"
    )


@dataclass
class UrlTable:
    """A normalized URL list: one entry per kept row, and the counts of what was not kept."""

    url: list[str] = field(default_factory=list)
    caption: list[str] = field(default_factory=list)
    uid: list[str] = field(default_factory=list)
    note: list[str] = field(default_factory=list)
    """'' or empty_caption / caption_truncated."""
    rows_in: int = 0
    counts: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self._seen: set[str] = set(self.uid)

    def __len__(self) -> int:
        return len(self.uid)

    def __contains__(self, uid: object) -> bool:
        return uid in self._seen

    def add(self, url: Any, caption: Any) -> None:
        """Normalize and count one row as read from a list; keep it unless malformed or repeated."""
        self.rows_in += 1
        url = normalize_url(url)
        if url is None:
            self.counts["malformed_row"] += 1
            return
        caption = "" if caption is None else str(caption).strip()
        note = ""
        if not caption:
            note = "empty_caption"
        elif len(caption) > CAPTION_MAX_CHARS:
            caption, note = caption[:CAPTION_MAX_CHARS], "caption_truncated"
        uid = row_uid(url, caption)
        if uid in self._seen:
            self.counts["duplicate_row"] += 1
            return
        if note:
            self.counts[note] += 1
        self.add_normalized(url, caption, uid, note)

    def add_normalized(self, url: str, caption: str, uid: str, note: str) -> None:
        """Keep a row that is already normalized (taken from another table), counting nothing."""
        self.url.append(url)
        self.caption.append(caption)
        self.uid.append(uid)
        self.note.append(note)
        self._seen.add(uid)

    def count_malformed(self) -> None:
        """Count a row that cannot be read at all (wrong width, unparsable line)."""
        self.rows_in += 1
        self.counts["malformed_row"] += 1

    def to_arrow(self) -> pa.Table:
        return pa.table(
            {"url": self.url, "caption": self.caption, "uid": self.uid, "note": self.note},
            schema=pa.schema([(c, pa.string()) for c in COLUMNS]),
        )

    @classmethod
    def from_arrow(cls, table: pa.Table) -> UrlTable:
        cols = table.select(list(COLUMNS)).to_pydict()
        return cls(url=cols["url"], caption=cols["caption"], uid=cols["uid"], note=cols["note"])

    def subset(self, keep: Sequence[bool]) -> UrlTable:
        """The rows where `keep` is true, with the same `rows_in` and counts."""
        out = UrlTable(rows_in=self.rows_in, counts=Counter(self.counts))
        for i, k in enumerate(keep):
            if k:
                out.add_normalized(self.url[i], self.caption[i], self.uid[i], self.note[i])
        return out


def read_url_list(
    path: str | Path,
    *,
    preset: str | None = None,
    url_col: str | None = None,
    caption_col: str | None = None,
) -> UrlTable:
    """Read and normalize a URL list (see the module docstring for layouts); never raises on a row."""
    fmt = list_format(path)
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
        if fmt != "tsv":
            raise ValueError(f"preset {preset} reads the published TSV layout; {path} is {fmt}")
        if url_col is not None or caption_col is not None:
            warnings.warn(
                f"--url-col/--caption-col have no effect with --preset {preset}", stacklevel=2
            )
        return _read_preset(path, PRESETS[preset])
    if fmt in ("tsv", "csv"):
        return _read_delimited(path, "\t" if fmt == "tsv" else ",", url_col, caption_col)
    if fmt == "parquet":
        return _read_parquet(path, url_col, caption_col)
    return _read_jsonl(path, url_col, caption_col)


def _read_preset(path: str | Path, columns: tuple[str, ...]) -> UrlTable:
    table = UrlTable()
    ui, ci = columns.index("url"), columns.index("caption")
    for row in _text_rows(path, "\t"):
        if row == []:
            continue  # a blank line
        if row is None or len(row) != len(columns):
            table.count_malformed()
        else:
            table.add(row[ui], row[ci])
    return table


def _read_delimited(
    path: str | Path, delimiter: str, url_col: str | None, caption_col: str | None
) -> UrlTable:
    table = UrlTable()
    rows = _text_rows(path, delimiter)
    first = next(rows, None)
    while first is not None and not any(cell.strip() for cell in first):
        first = next(rows, None)  # skip leading blank lines
    if first is None:
        return table
    width = len(first)
    if any("://" in cell for cell in first):  # no header: the first row is data
        ui = _column_index(url_col, width, "url_col")
        ci = _column_index(caption_col, width, "caption_col")
        if ui is None:
            ok = [i for i, cell in enumerate(first) if normalize_url(cell)]
            ui = ok[0] if ok else next(i for i, cell in enumerate(first) if "://" in cell)
        if ci is None:
            if width > 2:
                raise ValueError(
                    f"{path}: {width} columns and no header: pass url_col and caption_col as indices"
                )
            ci = 1 - ui if width == 2 else None
        rows = itertools.chain([first], rows)
    else:
        ui_name = _pick(first, url_col, URL_NAMES, "url_col")
        if ui_name is None:
            raise ValueError(f"{path}: no URL column among {first}; pass url_col")
        ci_name = _pick(first, caption_col, CAPTION_NAMES, "caption_col")
        ui = first.index(ui_name)
        ci = first.index(ci_name) if ci_name is not None else None
    for row in rows:
        if row == []:
            continue  # a blank line
        if row is None or len(row) != width:
            table.count_malformed()
        else:
            table.add(row[ui], row[ci] if ci is not None else "")
    return table


def _read_parquet(path: str | Path, url_col: str | None, caption_col: str | None) -> UrlTable:
    table = UrlTable()
    names = pq.read_schema(path).names
    u = _pick(names, url_col, URL_NAMES, "url_col")
    if u is None:
        raise ValueError(f"{path}: no URL column among {names}; pass url_col")
    c = _pick(names, caption_col, CAPTION_NAMES, "caption_col")
    data = pq.read_table(path, columns=[u] + ([c] if c else [])).to_pydict()
    for i, url in enumerate(data[u]):
        table.add(url, data[c][i] if c else "")
    return table


def _read_jsonl(path: str | Path, url_col: str | None, caption_col: str | None) -> UrlTable:
    table = UrlTable()
    with _open_text(path) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                obj = None
            if not isinstance(obj, dict):
                table.count_malformed()
                continue
            u = url_col or _pick(list(obj), None, URL_NAMES, "url_col")
            c = caption_col or _pick(list(obj), None, CAPTION_NAMES, "caption_col")
            table.add(obj.get(u) if u else None, obj.get(c) if c else "")
    return table


def _open_text(path: str | Path, **kwargs: Any) -> IO[str]:
    """A text stream of a (possibly gzipped) list; undecodable bytes are replaced, not fatal."""
    opener = gzip.open if str(path).endswith(".gz") else open
    return opener(path, "rt", encoding="utf-8", errors="replace", **kwargs)


def _text_rows(path: str | Path, delimiter: str) -> Iterator[list[str] | None]:
    """Rows of a tsv/csv file; None for a line the csv module cannot parse."""
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    old_limit = csv.field_size_limit(1 << 24)
    try:
        with _open_text(path, newline="") as f:
            reader = csv.reader(f, delimiter=delimiter, quoting=quoting)
            while True:
                try:
                    yield next(reader)
                except StopIteration:
                    return
                except csv.Error:
                    yield None
    finally:
        csv.field_size_limit(old_limit)


def _pick(
    names: Sequence[str], wanted: str | None, candidates: Sequence[str], what: str
) -> str | None:
    """The column `wanted` (which must exist), else the first of `candidates` in any case."""
    if wanted is not None:
        if wanted not in names:
            raise ValueError(
                f"{what} {wanted!r} is not a column of the URL list (columns: {list(names)})"
            )
        return wanted
    lower = {n.lower(): n for n in names}
    return next((lower[c] for c in candidates if c in lower), None)


def _column_index(value: str | None, width: int, what: str) -> int | None:
    if value is None:
        return None
    if not value.isdigit() or int(value) >= width:
        raise ValueError(
            f"{what} {value!r}: a list without header needs a 0-based column index < {width}"
        )
    return int(value)
