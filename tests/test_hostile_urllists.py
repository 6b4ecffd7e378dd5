"""Hostile URL lists (issue 9, section 3): one bad row costs one row, counted under its cause; a
file that cannot be read at all is one clear error naming it (exit status 2), never a traceback.
"""

from __future__ import annotations

import gzip
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import ingest
from pipelines.synthetic import make_images

ROWS = [(f"http://93.184.216.34/img/{i:04d}.jpg", f"caption {i}") for i in range(1000)]
"""The valid rows every hostile list is built around."""


def _csv(rows) -> str:
    return "".join(f"{u},{c}\n" for u, c in rows)


def unclosed_quote(tmp):
    """An unclosed quote in row 5 of a 1000-row CSV (it swallowed every later row before)."""
    text = "url,caption\n" + _csv(ROWS[:5]) + 'http://93.184.216.34/x.jpg,"unclosed\n'
    (tmp / "l.csv").write_text(text + _csv(ROWS[5:]))
    return tmp / "l.csv", {"malformed_row": 1}, ROWS


def multiline_caption(tmp):
    """A properly quoted caption with a line break (valid CSV) stays one row."""
    text = "url,caption\n" + 'http://93.184.216.34/m.jpg,"two\nlines"\n' + _csv(ROWS)
    (tmp / "l.csv").write_text(text)
    return tmp / "l.csv", {}, [("http://93.184.216.34/m.jpg", "two\nlines"), *ROWS]


def bom_header(tmp):
    """A UTF-8 BOM before the header (Excel's CSV) was read as part of the URL column's name."""
    (tmp / "l.csv").write_bytes(b"\xef\xbb\xbfurl,caption\n" + _csv(ROWS).encode())
    return tmp / "l.csv", {}, ROWS


def malformed_first_row(tmp):
    """A header-less TSV whose first row is junk was taken for a header ("no URL column")."""
    text = "junk first line\n" + "".join(f"{u}\t{c}\n" for u, c in ROWS)
    (tmp / "l.tsv").write_text(text)
    return tmp / "l.tsv", {"malformed_row": 1}, ROWS


def non_utf8_row(tmp):
    """A row with bytes that are not UTF-8 was kept with U+FFFD replacements, silently."""
    data = _csv(ROWS[:10]).encode() + b"http://93.184.216.34/l.jpg,caf\xe9 latin-1\n"
    (tmp / "l.csv").write_bytes(data + _csv(ROWS[10:]).encode())
    return tmp / "l.csv", {"undecodable_row": 1}, ROWS


def non_ascii_urls(tmp):
    """Non-ASCII paths and hosts failed in urllib forever (a retryable other_error): now
    percent-encoded (UTF-8) and IDNA-encoded; ASCII URLs are unchanged."""
    raw = [("http://93.184.216.34/café.jpg", "c1"), ("http://bücher.example/ä?q=ü#f", "c2")]
    (tmp / "l.csv").write_text("url,caption\n" + _csv(raw + ROWS), encoding="utf-8")
    fixed = [
        ("http://93.184.216.34/caf%C3%A9.jpg", "c1"),
        ("http://xn--bcher-kva.example/%C3%A4?q=%C3%BC#f", "c2"),
    ]
    return tmp / "l.csv", {}, fixed + ROWS


def parquet_binary_captions(tmp):
    """Binary captions were stored as "b'...'": decoded as UTF-8 now, undecodable ones counted."""
    caps = [c.encode() for _, c in ROWS] + [b"\xff\xfe"]
    urls = [u for u, _ in ROWS] + ["http://93.184.216.34/bad.jpg"]
    pq.write_table(
        pa.table({"url": urls, "caption": pa.array(caps, pa.binary())}), tmp / "l.parquet"
    )
    return tmp / "l.parquet", {"undecodable_row": 1}, ROWS


def parquet_list_captions(tmp):
    """List captions were stored as "['a', 'b']": malformed rows now (a null caption is empty)."""
    urls = ["http://93.184.216.34/a.jpg", "http://93.184.216.34/b.jpg"]
    table = pa.table({"url": urls, "caption": pa.array([["a", "b"], None], pa.list_(pa.string()))})
    pq.write_table(table, tmp / "l.parquet")
    return tmp / "l.parquet", {"malformed_row": 1, "empty_caption": 1}, [(urls[1], "")]


def parquet_nan_captions(tmp):
    """NaN captions were stored as 'nan': malformed rows now (a null caption is empty)."""
    urls = ["http://93.184.216.34/a.jpg", "http://93.184.216.34/b.jpg"]
    table = pa.table({"url": urls, "caption": pa.array([float("nan"), None], pa.float64())})
    pq.write_table(table, tmp / "l.parquet")
    return tmp / "l.parquet", {"malformed_row": 1, "empty_caption": 1}, [(urls[1], "")]


def jsonl_non_text(tmp):
    """A jsonl caption that is a number or an object, and a non-UTF-8 line, cost their own rows."""
    lines = [b'{"url": "http://93.184.216.34/n.jpg", "caption": 5}',
             b'{"url": "http://93.184.216.34/o.jpg", "caption": {"a": 1}}',
             b'{"url": "http://93.184.216.34/l.jpg", "caption": "caf\xe9"}']  # fmt: skip
    good = [f'{{"url": "{u}", "caption": "{c}"}}'.encode() for u, c in ROWS]
    (tmp / "l.jsonl").write_bytes(b"\n".join(lines + good) + b"\n")
    return tmp / "l.jsonl", {"malformed_row": 2, "undecodable_row": 1}, ROWS


CASES = [unclosed_quote, multiline_caption, bom_header, malformed_first_row, non_utf8_row,
         non_ascii_urls, parquet_binary_captions, parquet_list_captions, parquet_nan_captions,
         jsonl_non_text]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_hostile_list_costs_only_its_bad_rows(tmp_path, case):
    """Each hostile list loses exactly its bad rows, counted under their cause, and keeps every
    valid row with its exact URL and caption."""
    path, counts, valid = case(tmp_path)
    table = ingest.read_url_list(path)
    assert {k: n for k, n in table.counts.items() if n} == counts
    assert list(zip(table.url, table.caption, strict=True)) == valid
    assert table.rows_in == len(valid) + sum(n for k, n in counts.items() if k.endswith("_row"))


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("truncated.tsv.gz", gzip.compress(_csv(ROWS).replace(",", "\t").encode(), mtime=0)[:-200]),
        ("plain-text.tsv.gz", _csv(ROWS).encode()),
        ("corrupt.parquet", b"PAR1 this is not parquet PAR1"),
    ],
)
def test_unreadable_list_is_one_clear_error(tmp_path, capsys, name, data):
    """A truncated .gz, a .gz that is not gzip and a corrupt parquet end in one line naming the
    file (and how far it got) and exit status 2, not a traceback."""
    (tmp_path / name).write_bytes(data)
    args = ["--corpus", "c", "--root", str(tmp_path / "root"), "--url-list", str(tmp_path / name)]
    assert ingest.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: url_list") and name in err and "\n" not in err
    if name.endswith(".gz"):
        assert "lines were read" in err


def test_percent_encoded_url_is_fetchable(tmp_path):
    """The normalized non-ASCII URL reaches a loopback server as the UTF-8 percent-encoded path
    (the raw URL made urllib raise UnicodeEncodeError)."""
    seen: list[str] = []
    image = make_images(1)[0][1]

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", str(len(image)))
            self.end_headers()
            self.wfile.write(image)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = ingest.normalize_url(f"http://127.0.0.1:{server.server_address[1]}/img/café.jpg")
        no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with no_proxy.open(url, timeout=5) as r:
            assert r.read() == image
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    assert seen == ["/img/caf%C3%A9.jpg"]
