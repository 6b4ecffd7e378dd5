"""The ingest stage: a URL list -> img2dataset webdataset shards in `<root>/corpora/<corpus>/raw/`.

    python -m pipelines.ingest --corpus cc3m --url-list Train_GCC-training.tsv --preset cc3m

Steps, in order (each printed):
1. **Normalize** the list (tsv, csv, parquet, jsonl; `.gz` too) into a clean table `url, caption,
   uid`, where `uid` = first 16 hex of sha256(url + "\\n" + caption) links every downloaded sample
   back to its row (img2dataset keeps it through `save_additional_columns`). Rows without a usable
   http(s) URL or with the wrong number of columns are counted `malformed_row` and dropped; empty
   captions are kept and counted `empty_caption`; captions over `CAPTION_MAX_CHARS` are cut and
   counted `caption_truncated`; repeated rows are kept once and counted `duplicate_row`; rows
   already downloaded into this corpus (same uid) are counted `already_ingested` and skipped, rows
   that failed in an earlier run `failed_before` (left to `--retry-failed`).
2. **Refuse** URLs whose host is, or resolves to, a loopback, private, link-local, reserved,
   unspecified, multicast or otherwise non-global address (`blocked_address`), unless
   `allow_private_hosts`. Cloud metadata endpoints (169.254.169.254, fd00:ec2::254,
   metadata.google.internal, ...) are refused even then: no URL list needs them.
3. **Plan**: rows to download, rows refused by cause, shards expected; `--dry-run` stops here and
   writes nothing.
4. **Download** with img2dataset (webdataset + per-shard parquet and `_stats.json`, sha256 per
   sample, center-crop resize to `image_size`) into a staging folder, then move each verified shard
   into `raw/` and write its completion record (`Catalog.commit`) last, then `raw/manifest.json`.
5. **Report**: failures per cause, a summary table; an MLflow run (`pipelines.lineage.stage_run`)
   with the URL list as input dataset and the raw corpus as output dataset, by content digest.

URL-list layouts (`--preset` sets the columns; otherwise a header row is detected: a first row in
which no cell contains "://" is a header):
- `cc3m`: Google's Conceptual Captions `Train_GCC-training.tsv` / `Validation_GCC-1.1.0-Validation.tsv`:
  TSV, no header, `caption<TAB>url`.
- `cc12m`: `cc12m.tsv`: TSV, no header, `url<TAB>caption`.
- with a header: the URL column is `--url-col` or the first of url, image_url, img_url, link
  (any case); the caption column is `--caption-col` or the first of caption, text, alt, alt_text,
  description. Parquet and jsonl always name their columns (LAION's `URL`/`TEXT` work as is).
- without a header: a 2-column file is (url, caption) in whichever order its first row shows;
  wider files need `--url-col`/`--caption-col` as 0-based column indices.

Failure causes (per sample, from img2dataset's `status`/`error_message`): `http_404`, `http_4xx`,
`http_5xx`, `timeout`, `not_an_image` (no known image signature), `truncated_image` (an image
signature, but the bytes do not decode), `decompression_bomb`, `blocked_address` (at connect time,
see below), `robots_disallowed` (X-Robots-Tag noai/noindex, which img2dataset honours),
`other_error:<short message>`; and `shard_failed` for every sample of a shard whose tar or parquet
is missing, unreadable or inconsistent (not committed; its files go to `raw/_failed/`). A shard
with no successful sample is committed (its parquet keeps the per-sample errors) but also counts
as failed: the exit status is 1 when any shard failed or nothing could be downloaded.

Incremental runs: a URL list whose content digest is already in the manifest (ingested with the
same `allow_private_hosts`) is a no-op; a new list extends the corpus with new shards (its rows
that an earlier run downloaded or attempted are skipped); `--retry-failed` re-attempts the samples
whose latest attempt failed for a transient reason (timeout, 5xx, 408/429, connection errors, lost
shards) and that no shard has recovered since, into new shards; with nothing left to retry it is a
no-op. Permanent failures (404, other 4xx, not an image, truncated, bomb) are not retried.

Security notes (a URL list is untrusted input):
- img2dataset 1.47 downloads with `urllib.request.urlopen`, which follows HTTP redirects, and has
  no option to turn that off; it also resolves names again at connect time (DNS rebinding). So
  ingest passes img2dataset a resizer (`GuardedResizer`) whose unpickling in each download worker
  installs a urllib opener whose connections check every address they are about to connect to
  (the same rule as step 2, applied to each redirect hop and to the name as resolved then) and
  refuse with `blocked address: ...`. That opener also drops urllib's ftp:// and file:// handlers.
  The remaining gap: with an HTTP(S) proxy configured in the environment, the check sees the
  proxy's address, not the target's; the proxy itself must refuse internal targets.
- Decompression bombs: the resizer reads the image header with PIL first and refuses images over
  `MAX_IMAGE_PIXELS` before OpenCV allocates them (OpenCV alone accepts up to 2**30 pixels).
- img2dataset's extend mode globs `*.json` in its output folder and cannot parse the catalog's
  `NNNNN.done.json`, so the download runs in `raw/_staging/` with the first shard id set by ingest.
- One ingest per corpus at a time (there is no lock). Call `run` from the main thread of a program
  with an `if __name__ == "__main__":` guard: img2dataset spawns its workers and sets a SIGINT
  handler (ingest restores the previous one and turns its exit(0) into KeyboardInterrupt).
- The root must be a local path (a shared filesystem mount on a cluster): the shard checks read
  the staging folder through the local filesystem.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import gzip
import hashlib
import http.client
import importlib
import io
import ipaddress
import json
import math
import os
import re
import signal
import socket
import sys
import tarfile
import time
import urllib.request
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from unittest import mock
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

# img2dataset imports wandb and albumentations, whose import-time update check goes to the network;
# its download workers are spawned with this environment.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
from img2dataset.resizer import Resizer  # noqa: E402

from pipelines.catalog import DONE_SUFFIX, Catalog, DoneRecord, dataset_digest, sha256_text

CAPTION_MAX_CHARS = 1000
MAX_URL_CHARS = 4096
MAX_IMAGE_PIXELS = 89_478_485
"""PIL's default bomb threshold (~9459 x 9459); OpenCV alone would decode up to 2**30 pixels."""
PRESETS: dict[str, tuple[str, ...]] = {"cc3m": ("caption", "url"), "cc12m": ("url", "caption")}
URL_NAMES = ("url", "image_url", "img_url", "link")
CAPTION_NAMES = ("caption", "text", "alt", "alt_text", "description")
FORMATS = ("tsv", "csv", "parquet", "jsonl")
RESIZE_MODE = "center_crop"
ENCODE_FORMAT = "jpg"
MANIFEST = "manifest.json"
STAGING = "_staging"
SOURCES = "_sources"
FAILED = "_failed"

METADATA_HOSTS = frozenset(
    {"metadata.google.internal", "metadata.goog", "metadata", "metadata.azure.internal",
     "instance-data", "instance-data.ec2.internal"}
)  # fmt: skip
METADATA_IPS = frozenset(
    {"169.254.169.254", "169.254.170.2", "fd00:ec2::254", "100.100.100.200", "168.63.129.16"}
)

Resolver = Callable[..., Iterable[Any]]


# ==== address filter ==========================================================================
class BlockedAddressError(OSError):
    """A connection to a refused address (raised inside download workers, before connecting)."""


def address_refusal(ip: str, *, allow_private_hosts: bool = False) -> str | None:
    """Why an IP address must not be fetched from, or None. Metadata addresses are always refused."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])  # drop an IPv6 zone id
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if str(addr) in METADATA_IPS:
        return f"cloud metadata address {addr}"
    if allow_private_hosts:
        return None
    for attr, label in (
        ("is_loopback", "loopback"),
        ("is_unspecified", "unspecified"),
        ("is_link_local", "link-local"),
        ("is_multicast", "multicast"),
        ("is_private", "private"),
        ("is_reserved", "reserved"),
    ):
        if getattr(addr, attr):
            return f"{label} address {addr}"
    return None if addr.is_global else f"non-global address {addr}"


def _literal_ip(host: str) -> str | None:
    try:
        return str(ipaddress.ip_address(host.split("%", 1)[0]))
    except ValueError:
        return None


def _resolved_ips(host: str, port: int, resolver: Resolver) -> list[str]:
    infos = resolver(host, port, 0, socket.SOCK_STREAM)
    return [info[4][0] if isinstance(info, tuple) else str(info) for info in infos]


def host_refusal(
    host: str,
    port: int,
    resolver: Resolver = socket.getaddrinfo,
    *,
    allow_private_hosts: bool = False,
) -> str | None:
    """Why connecting to host:port is refused (checking every address it resolves to), or None.

    A name that does not resolve is not refused here: its download fails and is counted then.
    """
    host = host.lower().rstrip(".")
    if host in METADATA_HOSTS:
        return f"cloud metadata host {host}"
    if (ip := _literal_ip(host)) is not None:
        return address_refusal(ip, allow_private_hosts=allow_private_hosts)
    try:
        ips = _resolved_ips(host, port, resolver)
    except (OSError, UnicodeError):
        return None
    for ip in ips:
        if cause := address_refusal(ip, allow_private_hosts=allow_private_hosts):
            return f"{host} resolves to {cause}"
    return None


def check_url(
    url: str, resolver: Resolver = socket.getaddrinfo, *, allow_private_hosts: bool = False
) -> str | None:
    """The refusal cause of a URL (malformed, or its host is/resolves to a refused address), or None.

    Pure apart from `resolver` (default `socket.getaddrinfo`): pass a fake to decide without
    any network traffic.
    """
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as err:
        return f"malformed url: {err}"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "malformed url: not an http(s) URL with a host"
    return host_refusal(parts.hostname, port, resolver, allow_private_hosts=allow_private_hosts)


def guarded_create_connection(
    address: tuple[str, int],
    timeout: Any = socket._GLOBAL_DEFAULT_TIMEOUT,  # type: ignore[attr-defined]
    source_address: Any = None,
    *,
    allow_private_hosts: bool = False,
    resolver: Resolver = socket.getaddrinfo,
) -> socket.socket:
    """`socket.create_connection` that resolves once, checks every address, then connects to
    exactly the addresses it checked (so neither a redirect nor a DNS answer can slip past)."""
    host, port = address
    name = host.lower().rstrip(".")
    if name in METADATA_HOSTS:
        raise BlockedAddressError(f"blocked address: cloud metadata host {name}")
    literal = _literal_ip(host)
    ips = [literal] if literal else list(dict.fromkeys(_resolved_ips(host, port, resolver)))
    for ip in ips:
        if cause := address_refusal(ip, allow_private_hosts=allow_private_hosts):
            raise BlockedAddressError(f"blocked address: {host} -> {cause}")
    error: OSError | None = None
    for ip in ips:
        try:
            return socket.create_connection((ip, port), timeout, source_address)
        except OSError as err:
            error = err
    raise error or OSError(f"could not connect to {host}:{port}")


def guarded_opener(*, allow_private_hosts: bool = False) -> urllib.request.OpenerDirector:
    """A urllib opener for http(s) only, whose every connection (redirects included) is checked."""
    connect = functools.partial(guarded_create_connection, allow_private_hosts=allow_private_hosts)

    class GuardedHTTPConnection(http.client.HTTPConnection):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._create_connection = connect

    class GuardedHTTPSConnection(http.client.HTTPSConnection):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._create_connection = connect

    class GuardedHTTPHandler(urllib.request.HTTPHandler):
        def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
            return self.do_open(GuardedHTTPConnection, req)

    class GuardedHTTPSHandler(urllib.request.HTTPSHandler):
        def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
            return self.do_open(GuardedHTTPSConnection, req, context=self._context)  # type: ignore[attr-defined]

    opener = urllib.request.OpenerDirector()
    for handler in (
        urllib.request.ProxyHandler(),
        urllib.request.UnknownHandler(),
        urllib.request.HTTPDefaultErrorHandler(),
        urllib.request.HTTPRedirectHandler(),
        urllib.request.HTTPErrorProcessor(),
        GuardedHTTPHandler(),
        GuardedHTTPSHandler(),
    ):
        opener.add_handler(handler)
    return opener


# ==== URL lists ===============================================================================
def row_uid(url: str, caption: str) -> str:
    """The stable id of a URL-list row."""
    return hashlib.sha256(f"{url}\n{caption}".encode()).hexdigest()[:16]


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


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

    def add(self, url: Any, caption: Any) -> None:
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
        self._seen.add(uid)
        if note:
            self.counts[note] += 1
        self.url.append(url)
        self.caption.append(caption)
        self.uid.append(uid)
        self.note.append(note)

    def __post_init__(self) -> None:
        self._seen: set[str] = set(self.uid)

    def __len__(self) -> int:
        return len(self.uid)

    def to_arrow(self) -> pa.Table:
        return pa.table(
            {"url": self.url, "caption": self.caption, "uid": self.uid, "note": self.note},
            schema=pa.schema([(c, pa.string()) for c in ("url", "caption", "uid", "note")]),
        )

    @classmethod
    def from_arrow(cls, table: pa.Table) -> UrlTable:
        cols = table.select(["url", "caption", "uid", "note"]).to_pydict()
        return cls(url=cols["url"], caption=cols["caption"], uid=cols["uid"], note=cols["note"])

    def subset(self, keep: Sequence[bool]) -> UrlTable:
        out = UrlTable(rows_in=self.rows_in, counts=Counter(self.counts))
        for i, k in enumerate(keep):
            if k:
                out.url.append(self.url[i])
                out.caption.append(self.caption[i])
                out.uid.append(self.uid[i])
                out.note.append(self.note[i])
        out._seen = set(out.uid)
        return out


def _pick(
    names: Sequence[str], wanted: str | None, candidates: Sequence[str], what: str
) -> str | None:
    if wanted is not None:
        if wanted not in names:
            raise ValueError(
                f"{what} {wanted!r} is not a column of the URL list (columns: {list(names)})"
            )
        return wanted
    lower = {n.lower(): n for n in names}
    return next((lower[c] for c in candidates if c in lower), None)


def _text_rows(path: str | Path, delimiter: str) -> Iterator[list[str] | None]:
    """Rows of a tsv/csv file; None for a line the csv module cannot parse."""
    opener = gzip.open if str(path).endswith(".gz") else open
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    old_limit = csv.field_size_limit(1 << 24)
    try:
        with opener(path, "rt", encoding="utf-8", errors="replace", newline="") as f:
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


def _column_index(value: str | None, width: int, what: str) -> int | None:
    if value is None:
        return None
    if not value.isdigit() or int(value) >= width:
        raise ValueError(
            f"{what} {value!r}: a list without header needs a 0-based column index < {width}"
        )
    return int(value)


def read_url_list(
    path: str | Path,
    *,
    preset: str | None = None,
    url_col: str | None = None,
    caption_col: str | None = None,
) -> UrlTable:
    """Read and normalize a URL list (see the module docstring for layouts); never raises on a row."""
    fmt = list_format(path)
    table = UrlTable()
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
        if fmt != "tsv":
            raise ValueError(f"preset {preset} reads the published TSV layout; {path} is {fmt}")
        if url_col is not None or caption_col is not None:
            warnings.warn(
                f"--url-col/--caption-col have no effect with --preset {preset}", stacklevel=2
            )
        columns = PRESETS[preset]
        ui, ci = columns.index("url"), columns.index("caption")
        for row in _text_rows(path, "\t"):
            if row == []:
                continue  # a blank line
            if row is None or len(row) != len(columns):
                table.rows_in += 1
                table.counts["malformed_row"] += 1
            else:
                table.add(row[ui], row[ci])
        return table

    if fmt in ("tsv", "csv"):
        rows = _text_rows(path, "\t" if fmt == "tsv" else ",")
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
            rows = _chain_first(first, rows)
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
                table.rows_in += 1
                table.counts["malformed_row"] += 1
            else:
                table.add(row[ui], row[ci] if ci is not None else "")
        return table

    if fmt == "parquet":
        names = pq.read_schema(path).names
        u = _pick(names, url_col, URL_NAMES, "url_col")
        if u is None:
            raise ValueError(f"{path}: no URL column among {names}; pass url_col")
        c = _pick(names, caption_col, CAPTION_NAMES, "caption_col")
        data = pq.read_table(path, columns=[u] + ([c] if c else [])).to_pydict()
        for i, url in enumerate(data[u]):
            table.add(url, data[c][i] if c else "")
        return table

    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                obj = None
            if not isinstance(obj, dict):
                table.rows_in += 1
                table.counts["malformed_row"] += 1
                continue
            u = url_col or _pick(list(obj), None, URL_NAMES, "url_col")
            c = caption_col or _pick(list(obj), None, CAPTION_NAMES, "caption_col")
            table.add(obj.get(u) if u else None, obj.get(c) if c else "")
    return table


def _chain_first(first: list[str], rest: Iterator[list[str] | None]) -> Iterator[list[str] | None]:
    yield first
    yield from rest


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
    resolver = _unresolved if allow_private_hosts else (resolver or socket.getaddrinfo)
    hosts: dict[tuple[str, int], None] = {}
    keys = []
    for url in table.url:
        parts = urlsplit(url)
        key = (
            (parts.hostname or "").lower(),
            parts.port or (443 if parts.scheme == "https" else 80),
        )
        keys.append(key)
        hosts.setdefault(key)
    decide = functools.partial(_host_decision, resolver=resolver, allow=allow_private_hosts)
    with ThreadPoolExecutor(max(1, min(threads, len(hosts)))) as pool:
        causes = dict(zip(hosts, pool.map(decide, hosts), strict=True))
    reasons: Counter[str] = Counter(causes[k] for k in keys if causes[k])
    kept = table.subset([causes[k] is None for k in keys])
    kept.counts["blocked_address"] += sum(reasons.values())
    return kept, reasons


def _unresolved(host: str, *args: Any) -> list[Any]:
    raise socket.gaierror(f"{host}: not resolved at planning time")


def _host_decision(key: tuple[str, int], *, resolver: Resolver, allow: bool) -> str | None:
    return host_refusal(key[0], key[1], resolver, allow_private_hosts=allow)


# ==== failure causes ==========================================================================
_HTTP = re.compile(r"HTTP Error (\d{3})")
RETRYABLE_HTTP = {408, 425, 429}


def failure_cause(status: str | None, error_message: str | None) -> str | None:
    """The cause of a failed img2dataset sample (None for a success)."""
    if status == "success":
        return None
    msg = (error_message or "").strip()
    low = msg.lower()
    if m := _HTTP.search(msg):
        code = int(m.group(1))
        if code == 404:
            return "http_404"
        return "http_5xx" if code >= 500 else "http_4xx"
    if "blocked address" in low:
        return "blocked_address"
    if "timed out" in low or "timeout" in low:
        return "timeout"
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
    if m := _HTTP.search(error_message or ""):
        return int(m.group(1)) in RETRYABLE_HTTP or int(m.group(1)) >= 500
    return cause == "timeout" or cause.startswith("other_error:")


# ==== img2dataset hooks =======================================================================
_SIGNATURES = (
    (b"\xff\xd8\xff", "jpeg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"\x00\x00\x01\x00", "ico"),
    (b"\x00\x00\x00\x0cjP  ", "jpeg2000"),
)


def sniff_image(head: bytes) -> str | None:
    """The image format a byte prefix announces, or None when it is no known image signature."""
    for magic, kind in _SIGNATURES:
        if head.startswith(magic):
            return kind
    if head[:2] == b"BM" and head[6:10] == b"\0\0\0\0":  # BMP's reserved header fields are zero
        return "bmp"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[4:8] == b"ftyp":
        return "heif/avif"
    return None


def precheck_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> str | None:
    """Refuse non-images and decompression bombs from the header alone (no pixel decoding)."""
    kind = sniff_image(data[:16])
    if kind is None:
        return "not an image: no known image signature"
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                width, height = im.size
    except Image.DecompressionBombError as err:
        return f"decompression bomb: {err}"
    except Exception:  # noqa: BLE001 - PIL cannot read the header: let OpenCV decide
        return None
    if width * height > max_pixels:
        return f"decompression bomb: {kind} declares {width}x{height} pixels (limit {max_pixels})"
    return None


class GuardedResizer(Resizer):
    """img2dataset's Resizer with ingest's checks; also arms the connection guard in each worker.

    img2dataset pickles its downloader (and so this resizer) into every spawned download worker;
    `__setstate__` runs there, before any URL of the shard is fetched, and installs
    `guarded_opener` as urllib's global opener of that worker process.
    """

    def __init__(
        self,
        *args: Any,
        allow_private_hosts: bool = False,
        max_pixels: int = MAX_IMAGE_PIXELS,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.allow_private_hosts = allow_private_hosts
        self.max_pixels = max_pixels

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        urllib.request.install_opener(guarded_opener(allow_private_hosts=self.allow_private_hosts))

    def __call__(self, img_stream: io.BytesIO, blurring_bbox_list: Any = None) -> tuple:
        data = img_stream.getvalue()
        if cause := precheck_image(data, self.max_pixels):
            return None, None, None, None, None, cause
        img_stream.seek(0)
        out = super().__call__(img_stream, blurring_bbox_list)
        error = out[-1]
        if error == "Image decoding error":
            error = f"truncated or corrupt {sniff_image(data[:16])} image: decoding failed"
        elif error and "CV_IO_MAX_IMAGE_PIXELS" in error:
            error = "decompression bomb: over OpenCV's pixel limit"
        return (*out[:-1], error)


# ==== shards ==================================================================================
def raw_shard_digest(pairs: Iterable[tuple[str, str]]) -> str:
    """A raw shard's digest: the hash of its successful (key, image sha256) pairs, sorted."""
    return sha256_text(*(f"{k}:{h}" for k, h in sorted(pairs)))


class ShardError(Exception):
    """A downloaded shard that cannot be committed (missing or unreadable tar/parquet)."""


@dataclass
class ShardInfo:
    shard: str
    samples: int
    successes: int
    digest: str
    failures: dict[str, int]
    uids: list[str]
    success_uids: list[str]


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
        success_uids=[r["uid"] for r in ok],
    )


# ==== result ==================================================================================
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


# ==== manifest ================================================================================
def _shard_name(i: int) -> str:
    return f"{i:05d}"


def read_manifest(catalog: Catalog, raw: str) -> dict[str, Any]:
    path = f"{raw}/{MANIFEST}"
    if not catalog.exists(path):
        return {"format": 1, "shards": {}, "sources": {}}
    return json.loads(catalog.read_text(path))


def _write_manifest(catalog: Catalog, raw: str, manifest: dict[str, Any]) -> None:
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
    """The raw corpus's dataset digest: `Catalog.dataset_digest` of its committed shards."""
    return dataset_digest({sid: r.digest for sid, r in catalog.committed(raw).items()})


def _shard_id_of(name: str) -> str | None:
    m = re.match(r"^(\d{5,})[._]", name)
    return m.group(1) if m else None


def _success_uids(catalog: Catalog, raw: str) -> tuple[set[str], dict[str, tuple[str, str]]]:
    """uids downloaded successfully in committed shards, and each uid's latest failure."""
    success: set[str] = set()
    latest: dict[str, tuple[str, str]] = {}
    for sid in sorted(catalog.committed(raw)):
        t = pq.read_table(f"{raw}/{sid}.parquet", columns=["uid", "status", "error_message"])
        for uid, status, msg in zip(
            *(t.column(c).to_pylist() for c in ("uid", "status", "error_message"))
        ):
            if status == "success":
                success.add(uid)
                latest.pop(uid, None)
            elif uid not in success:
                latest[uid] = (status, msg)
    return success, latest


def _sweep(catalog: Catalog, raw: str) -> int:
    """Delete what a killed run left: staging, tmp files, data files of uncommitted shards.
    Returns the first free shard id."""
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
    for path in catalog.list_files(raw):
        name = path.rsplit("/", 1)[-1]
        if name.endswith("_stats.json") and _shard_id_of(name) not in records:
            fs.delete_file(path)
    used = [int(s) for s in records]
    manifest = read_manifest(catalog, raw)
    for src in manifest["sources"].values():
        used += [int(s) for s in src.get("failed_shards", {})]
    return max(used, default=-1) + 1


# ==== the stage ===============================================================================
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
    for name, value, low in (
        ("samples_per_shard", samples_per_shard, 1),
        ("image_size", image_size, 8),
        ("processes", processes, 1),
        ("threads", threads, 1),
        ("retries", retries, 0),
    ):
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
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

    success, failed = _success_uids(catalog, raw) if catalog.exists(raw) else (set(), {})
    if success or failed:
        # Earlier failures are re-attempted by --retry-failed only (which knows which are transient).
        seen = [u in success or (not retry_failed and u in failed) for u in table.uid]
        table.counts["already_ingested"] += sum(u in success for u in table.uid)
        table.counts["failed_before"] += sum(
            s and u not in success for s, u in zip(seen, table.uid)
        )
        table = table.subset([not s for s in seen])
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
            kind=kind, origins=origins, url_list=url_list, settings=settings,
            samples_per_shard=samples_per_shard, allow_private_hosts=allow_private_hosts,
            image_size=image_size, processes=processes, threads=threads,
            timeout_s=timeout_s, retries=retries,
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
    success, latest = _success_uids(catalog, raw)
    table = UrlTable()
    for digest in sorted(sources):
        path = f"{raw}/{SOURCES}/{digest[:16]}.parquet"
        if not catalog.exists(path):
            continue
        rows = UrlTable.from_arrow(pq.read_table(path))
        for i, uid in enumerate(rows.uid):
            if uid in success or uid in table._seen:
                continue
            if uid in latest and not is_retryable(*latest[uid]):
                continue
            table.url.append(rows.url[i])
            table.caption.append(rows.caption[i])
            table.uid.append(uid)
            table.note.append(rows.note[i])
            table._seen.add(uid)
    table.rows_in = len(table)
    return (table if len(table) else None), "retry", sorted(sources)


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
    samples_per_shard: int,
    allow_private_hosts: bool,
    image_size: int,
    processes: int,
    threads: int,
    timeout_s: float,
    retries: int,
) -> None:
    i2d = importlib.import_module("img2dataset.main")  # the package re-exports a function `main`

    fs = catalog.fs
    fs.create_dir(raw, recursive=True)
    first_id = _sweep(catalog, raw)
    staging = f"{raw}/{STAGING}"
    out_dir = f"{staging}/out"
    fs.create_dir(out_dir, recursive=True)
    if kind == "list":  # every row ever submitted from this list, for --retry-failed
        sources_path = f"{raw}/{SOURCES}/{result.source_digest[:16]}.parquet"
        submitted = table.to_arrow()
        if catalog.exists(sources_path):  # the same list again (e.g. allow_private_hosts changed)
            before = pq.read_table(sources_path)
            fresh = pc.invert(pc.is_in(submitted["uid"], value_set=before["uid"].combine_chunks()))
            submitted = pa.concat_tables([before, submitted.filter(fresh)])
        catalog.write_atomic(sources_path, _parquet_bytes(submitted))
    input_path = f"{staging}/input.parquet"
    catalog.write_atomic(
        input_path, _parquet_bytes(table.to_arrow().select(["url", "caption", "uid"]))
    )
    notes = dict(zip(table.uid, table.note, strict=True))

    def reader_from_first_id(*args: Any, **kwargs: Any) -> Any:
        reader = real_reader(*args, **kwargs)
        reader.start_shard_id = first_id  # shard ids continue the corpus (see module docstring)
        return reader

    real_reader = i2d.Reader
    resizer = functools.partial(GuardedResizer, allow_private_hosts=allow_private_hosts)
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
            image_size=image_size,
            resize_mode=RESIZE_MODE,
            encode_format=ENCODE_FORMAT,
            processes_count=processes,
            thread_count=threads,
            timeout=timeout_s,
            retries=retries,
            number_sample_per_shard=samples_per_shard,
            extract_exif=False,
            compute_hash="sha256",
            enable_wandb=False,
            distributor="multiprocessing",
            incremental_mode="extend",
            max_shard_retry=1,
        )
    elapsed = time.perf_counter() - start

    failures: Counter[str] = Counter()
    spans: list[tuple[float, float]] = []
    source = {
        "kind": kind, "uri": str(url_list) if url_list else catalog.uri(raw), "rows": result.rows_in,
        "submitted": len(table), "allow_private_hosts": allow_private_hosts, "origins": origins,
        "planning": result.planning, "shards": [], "failed_shards": {},
        "ingested_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }  # fmt: skip
    for i in range(math.ceil(len(table) / samples_per_shard)):
        sid = _shard_name(first_id + i)
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
            _keep_failed(catalog, out_dir, raw, sid)
            continue
        for suffix in (".tar", ".parquet", "_stats.json"):
            fs.move(f"{out_dir}/{sid}{suffix}", f"{raw}/{sid}{suffix}")
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
        source["shards"].append(sid)
    fs.delete_dir(staging)

    result.failures = dict(sorted(failures.items()))
    # Download throughput over the shards' own start/end times (img2dataset's stats), which leaves
    # out the start-up of its worker processes; wall_s includes it.
    busy = max((e for _, e in spans), default=0.0) - min((s for s, _ in spans), default=0.0)
    result.images_per_s = result.successes / busy if busy > 0 else 0.0
    result.wall_s = elapsed
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
    _write_manifest(catalog, raw, manifest)
    if result.failed_shards or result.successes == 0:
        result.exit_code = 1
    result.status = "ingested"
    result.message = f"{len(result.new_shards)} new shards, {result.successes} images" + (
        f"; {len(result.failed_shards)} shards failed: {', '.join(result.failed_shards)}"
        if result.failed_shards
        else ""
    )


@contextlib.contextmanager
def _interrupt_is_not_success() -> Iterator[None]:
    try:
        yield
    except SystemExit as exit_:  # img2dataset's Ctrl-C handler: sys.exit(0)
        raise KeyboardInterrupt("ingest interrupted during download") from exit_


def _keep_failed(catalog: Catalog, out_dir: str, raw: str, sid: str) -> None:
    """Move what exists of a failed shard to raw/_failed/ for inspection (never read as data)."""
    for name in (f"{sid}.tar", f"{sid}.parquet", f"{sid}_stats.json"):
        if catalog.exists(f"{out_dir}/{name}"):
            catalog.fs.create_dir(f"{raw}/{FAILED}", recursive=True)
            catalog.fs.move(f"{out_dir}/{name}", f"{raw}/{FAILED}/{name}")


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


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
    # Import ourselves by name: the download workers unpickle `pipelines.ingest.GuardedResizer`,
    # not `__main__.GuardedResizer`.
    from pipelines.ingest import main as _main

    sys.exit(_main())
