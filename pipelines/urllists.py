"""URL lists: read a tsv/csv/parquet/jsonl list (`.gz` too) into one clean table `url, caption, uid`.

Layouts (`preset` sets the columns; otherwise a header row is detected from the first
`SAMPLE_ROWS` rows: the first row is a header when a column name is given (`url_col` not an
index), or when none of its cells holds "://" and one names a URL column or no later row holds a
URL; else it is data, and a malformed first row is one `malformed_row`):
- `cc3m`: Google's Conceptual Captions `Train_GCC-training.tsv` / `Validation_GCC-1.1.0-Validation.tsv`:
  TSV, no header, `caption<TAB>url`.
- `cc12m`: `cc12m.tsv`: TSV, no header, `url<TAB>caption`.
- with a header: the URL column is `url_col` or the first of url, image_url, img_url, link
  (any case); the caption column is `caption_col` or the first of caption, text, alt, alt_text,
  description. Parquet and jsonl always name their columns (LAION's `URL`/`TEXT` work as is).
- without a header: a 2-column file is (url, caption) in whichever order most sampled rows show;
  wider files need `url_col`/`caption_col` as 0-based column indices. The width is the most
  common width of the sampled rows that hold a URL.

Design choices:
- A URL list is untrusted, often web-scraped input: reading it never raises on a row, and one bad
  row costs one row. A row without a usable http(s) URL, with the wrong number of columns, or
  with a caption that is not text (a list, a number, NaN) is counted `malformed_row` and dropped;
  a row that is not valid UTF-8 is counted `undecodable_row` and dropped (a replaced byte would
  make another URL); an empty caption is kept and counted `empty_caption`; a caption over
  `CAPTION_MAX_CHARS` is cut and counted `caption_truncated` (these two are the row's *note*,
  kept with it up to the shard's completion record); a repeated row is kept once and counted
  `duplicate_row`.
- `uid` = first 16 hex of sha256(url + "\\n" + caption), of the normalized row: it links every
  downloaded sample back to its row (img2dataset keeps it through `save_additional_columns`) and
  tells an incremental run which rows an earlier run downloaded, so it must never change.
- Text is read line by line: UTF-8 (a leading BOM is dropped), each line decoded on its own.
  The published TSVs hold unescaped quotes in captions, so TSV is read with `QUOTE_NONE`, one line
  per row. In CSV a quoted field may span lines, but only over lines that hold no "://" and at
  most `MAX_RECORD_LINES`: an unclosed quote costs its own row, not every row after it.
- URLs are made fetchable without changing any ASCII URL (uids stay stable): a non-ASCII host is
  IDNA-encoded, non-ASCII characters after it are percent-encoded as UTF-8 (`café.jpg` ->
  `caf%C3%A9.jpg`); spaces become %20.
- Only a list that cannot be read at all (unknown format, no URL column, a truncated or non-gzip
  `.gz`, a corrupt parquet) raises `ValueError`, naming the file (and the lines read).
- A list is identified by the sha256 of its file bytes (`file_sha256`), not by its path.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import itertools
import json
import re
import warnings
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

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

SAMPLE_ROWS = 100
"""Rows read ahead to decide header or not, the width and the URL column."""
MAX_RECORD_LINES = 8
"""Lines one CSV record (a quoted field with line breaks) may span."""
MAX_LINE_BYTES = 1 << 20
"""A longer line is one malformed row (read in pieces, never held whole)."""

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_NON_ASCII = re.compile(r"[^\x00-\x7f]+")


@dataclass(frozen=True)
class _Bad:  # a row that cannot be used at all, by cause (yielded by the row readers)
    cause: str


MALFORMED, UNDECODABLE = _Bad("malformed_row"), _Bad("undecodable_row")


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
    return url if url.isascii() else _ascii_url(url, parts)


def _ascii_url(url: str, parts: Any) -> str | None:
    """A non-ASCII URL made fetchable: IDNA host, percent-encoded UTF-8 elsewhere."""
    start = len(parts.scheme) + 3
    if url[start - 3 : start] != "://" or url[start : start + len(parts.netloc)] != parts.netloc:
        return None
    userinfo, at, hostport = parts.netloc.rpartition("@")
    host = parts.hostname
    if not host.isascii():
        try:
            ascii_host = host.encode("idna").decode("ascii")
        except UnicodeError:
            return None
        # hostname is lowercased; the netloc keeps the case: replace case-insensitively, once
        hostport = re.sub(re.escape(host), lambda _: ascii_host, hostport, count=1, flags=re.I)
        if not hostport.isascii():
            return None
    netloc = _NON_ASCII.sub(lambda m: quote(m.group(0), safe=""), userinfo) + at + hostport
    rest = _NON_ASCII.sub(lambda m: quote(m.group(0), safe=""), url[start + len(parts.netloc) :])
    return url[:start] + netloc + rest


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
        """Normalize and count one row as read from a list; keep it unless malformed or repeated.

        Values may be str, or bytes (UTF-8); a None caption is empty; anything else is malformed.
        """
        url, caption = _text(url), "" if caption is None else _text(caption)
        for value in (url, caption):
            if isinstance(value, _Bad):
                self.count(value)
                return
        url = normalize_url(url)
        if url is None:
            self.count(MALFORMED)
            return
        self.rows_in += 1
        caption = caption.strip()
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
        self.count(MALFORMED)

    def count(self, bad: _Bad) -> None:
        """Count a row dropped for `bad.cause` (malformed_row, undecodable_row)."""
        self.rows_in += 1
        self.counts[bad.cause] += 1

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
    """Read and normalize a URL list (see the module docstring for layouts); never raises on a row.

    Raises ValueError for a list that cannot be read at all, naming the file (and the line).
    """
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
    for row in _records(path, "\t"):
        if isinstance(row, _Bad):
            table.count(row)
        elif row == []:
            continue  # a blank line
        elif len(row) != len(columns):
            table.count_malformed()
        else:
            table.add(row[ui], row[ci])
    return table


def _read_delimited(
    path: str | Path, delimiter: str, url_col: str | None, caption_col: str | None
) -> UrlTable:
    table = UrlTable()
    records = _records(path, delimiter)
    sample = list(itertools.islice((r for r in records if r != []), SAMPLE_ROWS))
    rows = itertools.chain(sample, records)
    good = [r for r in sample if not isinstance(r, _Bad)]
    if not good:
        for row in sample:
            table.count(row)  # type: ignore[arg-type]
        return table
    first = good[0]
    if _is_header(first, good[1:], url_col, caption_col):
        ui_name = _pick(first, url_col, URL_NAMES, "url_col")
        if ui_name is None:
            raise ValueError(f"{path}: no URL column among {first}; pass url_col")
        ci_name = _pick(first, caption_col, CAPTION_NAMES, "caption_col")
        width, ui = len(first), first.index(ui_name)
        ci = first.index(ci_name) if ci_name is not None else None
        skip = sample.index(first)
        for row in sample[:skip]:
            table.count(row)  # type: ignore[arg-type]
        rows = itertools.chain(sample[skip + 1 :], records)
    else:  # no header: every row is data
        with_url = [r for r in good if any(normalize_url(c) for c in r)] or [first]
        width = Counter(len(r) for r in with_url).most_common(1)[0][0]
        ui = _column_index(url_col, width, "url_col")
        ci = _column_index(caption_col, width, "caption_col")
        if ui is None:  # the column most sampled rows have their first URL in
            at = Counter(
                next((i for i, c in enumerate(r) if normalize_url(c)), -1) for r in with_url
            )
            at.pop(-1, None)
            ui = (
                at.most_common(1)[0][0]
                if at
                else next(i for i, c in enumerate(first) if "://" in c)
            )
        if ci is None:
            if width > 2:
                raise ValueError(
                    f"{path}: {width} columns and no header: pass url_col and caption_col as indices"
                )
            ci = 1 - ui if width == 2 else None
    for row in rows:
        if isinstance(row, _Bad):
            table.count(row)
        elif row == []:
            continue  # a blank line
        elif len(row) != width:
            table.count_malformed()
        else:
            table.add(row[ui], row[ci] if ci is not None else "")
    return table


def _is_header(first: list[str], later: list[list[str]], url_col: str | None, caption_col: str | None) -> bool:  # fmt: skip
    """Whether the first row names the columns (module docstring: Layouts)."""
    if any(col is not None and not col.isdigit() for col in (url_col, caption_col)):
        return True
    if any("://" in cell for cell in first):
        return False
    if any(cell.strip().lower() in URL_NAMES for cell in first):
        return True
    return not any(normalize_url(cell) for row in later for cell in row)


def _read_parquet(path: str | Path, url_col: str | None, caption_col: str | None) -> UrlTable:
    table = UrlTable()
    try:
        names = pq.read_schema(path).names
        u = _pick(names, url_col, URL_NAMES, "url_col")
        c = _pick(names, caption_col, CAPTION_NAMES, "caption_col")
        data = pq.read_table(path, columns=[u] + ([c] if c else [])).to_pydict() if u else {}
    except (pa.ArrowException, OSError) as err:
        raise ValueError(f"url_list {path}: not a readable parquet file ({err})") from None
    if u is None:
        raise ValueError(f"{path}: no URL column among {names}; pass url_col")
    for i, url in enumerate(data[u]):
        table.add(url, data[c][i] if c else "")
    return table


def _read_jsonl(path: str | Path, url_col: str | None, caption_col: str | None) -> UrlTable:
    table = UrlTable()
    for line in _lines(path):
        if isinstance(line, _Bad):
            table.count(line)
            continue
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


def _text(value: Any) -> str | _Bad:
    """A cell as text: str as is, bytes decoded as UTF-8; any other type is malformed."""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes | bytearray):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return UNDECODABLE
    return MALFORMED  # None URL, list, dict, number, NaN (None captions are handled by `add`)


def _lines(path: str | Path) -> Iterator[str | _Bad]:
    """The decoded lines of a (possibly gzipped) text list, without line ends; UNDECODABLE for a
    line that is not UTF-8, MALFORMED for one over MAX_LINE_BYTES."""
    gz = str(path).endswith(".gz")
    number = 0
    try:
        with gzip.open(path, "rb") if gz else open(path, "rb") as f:
            while raw := f.readline(MAX_LINE_BYTES):
                number += 1
                if len(raw) == MAX_LINE_BYTES and not raw.endswith(b"\n"):
                    while (more := f.readline(MAX_LINE_BYTES)) and not more.endswith(b"\n"):
                        pass
                    yield MALFORMED
                    continue
                if number == 1:
                    raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 BOM
                try:
                    yield raw.decode("utf-8").rstrip("\r\n")
                except UnicodeDecodeError:
                    yield UNDECODABLE
    except (EOFError, OSError, zlib.error) as err:
        what = "a truncated or corrupt gzip file" if gz else "unreadable"
        raise ValueError(
            f"url_list {path}: {what} ({err}); {number} lines were read before the error"
        ) from None


def _records(path: str | Path, delimiter: str) -> Iterator[list[str] | _Bad]:
    """Rows of a tsv/csv list: cells, [] for a blank line, or a _Bad marker. TSV rows are lines;
    a CSV record may span lines inside quotes (module docstring), else each line is a row."""
    pending: list[str] = []
    for line in _lines(path):
        if isinstance(line, _Bad):
            yield from [MALFORMED] * len(pending)
            pending = []
            yield line
            continue
        if pending:
            if "://" in line:  # a new row: the open quote above was a broken row, not a field
                yield from [MALFORMED] * len(pending)
                pending = []
            else:
                pending.append(line)
                row = _parse("\n".join(pending), delimiter)
                if row is not None or len(pending) >= MAX_RECORD_LINES:
                    yield from [row] if row is not None else [MALFORMED] * len(pending)
                    pending = []
                continue
        row = _parse(line, delimiter)
        if row is None:
            pending = [line]
        else:
            yield row
    yield from [MALFORMED] * len(pending)


def _parse(text: str, delimiter: str) -> list[str] | _Bad | None:
    """One record's cells; None while a quoted field is still open (CSV)."""
    if delimiter == "\t":
        return text.split("\t") if text else []
    try:
        rows = list(csv.reader(io.StringIO(text, newline=""), delimiter=",", strict=True))
    except csv.Error as err:
        if "unexpected end of data" in str(err):
            return None
        try:  # e.g. `"a"b`: what the csv module reads leniently, as before
            rows = list(csv.reader(io.StringIO(text, newline=""), delimiter=","))
        except csv.Error:
            return MALFORMED
    if len(rows) > 1:
        return MALFORMED
    return rows[0] if rows else []


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
