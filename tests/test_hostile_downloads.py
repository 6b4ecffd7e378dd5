"""Hostile servers (issue 9, sections 1 and 2): every download is bounded in time and bytes, and
images whose resize would blow up memory are refused from their header; valid images all survive.

`HostileServer` binds 127.0.0.1 (port 0), is started and stopped by each test, and bounds every
one of its misbehaviours in time and bytes itself (so a test against unfixed code ends too).
"""

from __future__ import annotations

import io
import pickle
import struct
import threading
import time
import urllib.request
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from pipelines import ingest
from pipelines.synthetic import make_images

DRIP_INTERVAL_S = 0.3
DRIP_FOR_S = 90.0
"""A drip ends by itself after this long (or when the server stops)."""
HUGE_BYTES = 40 << 20
ENDLESS_CAP_BYTES = 256 << 20
"""An 'endless' body ends here: far over any cap, small enough for a test machine."""


def thin_png(width: int, height: int) -> bytes:
    """A valid, tiny greyscale PNG of width x height (all zeros, compressed)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        body = kind + payload
        return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body))

    rows = (b"\x00" + b"\x00" * width) * height
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(rows, 9))
        + chunk(b"IEND", b"")
    )


class HostileServer:
    """/img/<name> (good JPEGs), /drip (headers, then one body byte per 0.3 s), /drip-headers (the
    status line, then one header byte per 0.3 s), /huge (40 MiB with its Content-Length),
    /endless (no Content-Length, 1 MiB chunks up to 256 MiB), /loop (302 to itself),
    /thin/<W>x<H>.png (a thin PNG). Counts requests per path."""

    def __init__(self, images: list[tuple[str, bytes, str]]) -> None:
        self.images = {name: data for name, data, _ in images}
        self.stop_event = threading.Event()
        self.requests: dict[str, int] = {}
        self.sent: dict[str, int] = {}
        self._lock = threading.Lock()

    def __enter__(self) -> HostileServer:
        handler = type("Handler", (_Handler,), {"owner": self})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def count(self, table: dict[str, int], path: str, n: int = 1) -> None:
        with self._lock:
            table[path] = table.get(path, 0) + n


class _Handler(BaseHTTPRequestHandler):
    owner: HostileServer
    protocol_version = "HTTP/1.0"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _body(self, path: str, chunks, length: int | None, ctype: str = "image/jpeg") -> None:
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        if length is not None:
            self.send_header("Content-Length", str(length))
        self.end_headers()
        for chunk in chunks:
            if self.owner.stop_event.is_set():
                return
            self.wfile.write(chunk)
            self.wfile.flush()
            self.owner.count(self.owner.sent, path, len(chunk))

    def do_GET(self) -> None:
        owner, path = self.owner, self.path.split("?")[0]
        owner.count(owner.requests, path)
        drips = int(DRIP_FOR_S / DRIP_INTERVAL_S)
        try:
            if path.startswith("/img/") and path[5:] in owner.images:
                data = owner.images[path[5:]]
                self._body(path, [data], len(data))
            elif path == "/drip":
                self._body(path, _drip(owner.stop_event, b"\xff" * drips), 10_000)
            elif path == "/drip-headers":
                self.wfile.write(b"HTTP/1.0 200 OK\r\nX-Slow: ")
                for chunk in _drip(owner.stop_event, b"a" * drips):
                    self.wfile.write(chunk)
                    self.wfile.flush()
            elif path == "/huge":
                mib = b"\xff\xd8\xff" + b"\x00" * ((1 << 20) - 3)
                self._body(path, (mib for _ in range(HUGE_BYTES >> 20)), HUGE_BYTES)
            elif path == "/endless":
                mib = b"\x89PNG\r\n\x1a\n" + b"\x00" * ((1 << 20) - 8)
                self._body(path, (mib for _ in range(ENDLESS_CAP_BYTES >> 20)), None, "image/png")
            elif path == "/loop":
                self.send_response(302)
                self.send_header("Location", "/loop")
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif path.startswith("/thin/"):
                w, h = (int(v) for v in path[6:].removesuffix(".png").split("x"))
                data = thin_png(w, h)
                self._body(path, [data], len(data), "image/png")
            else:
                self.send_error(404)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up: what a bounded download should do


def _drip(stop: threading.Event, data: bytes):
    for i in range(len(data)):
        if stop.wait(DRIP_INTERVAL_S):
            return
        yield data[i : i + 1]


@pytest.fixture
def armed_worker():
    """This process armed like an img2dataset download worker (unpickled GuardedResizer), with
    urllib's opener and img2dataset's download function restored afterwards."""
    import img2dataset.downloader

    saved = (urllib.request._opener, img2dataset.downloader.download_image)  # type: ignore[attr-defined]
    resizer = ingest.GuardedResizer(
        image_size=32, resize_mode="center_crop", resize_only_if_bigger=False,
        allow_private_hosts=True, deadline_s=2.0, max_image_bytes=1_000_000,
    )  # fmt: skip
    pickle.loads(pickle.dumps(resizer))  # what each spawned worker does: arms the process
    yield resizer
    urllib.request.install_opener(saved[0])
    img2dataset.downloader.download_image = saved[1]


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("path", "cause", "max_s"),
    [
        ("/img/00000.jpg", None, 2),
        ("/drip", "timeout", 4),
        ("/drip-headers", "timeout", 4),
        ("/huge", "too_large", 2),
        ("/endless", "too_large", 4),
        ("/loop", "redirect_loop", 4),
    ],
)
def test_worker_download_is_bounded(armed_worker, path, cause, max_s):
    """In an armed download worker, img2dataset's own download call ends within the deadline (2 s)
    for dripping bodies and headers, refuses a huge Content-Length without reading the body and an
    endless body after the cap (1 MB), and counts a redirect loop as redirect_loop."""
    import img2dataset.downloader as d

    images = make_images(1, seed=11)
    with HostileServer(images) as srv:
        start = time.monotonic()
        key, stream, error = d.download_image_with_retry(
            (0, srv.url(path)), timeout=1.5, retries=0, user_agent_token=None,
            disallowed_header_directives=None,
        )  # fmt: skip
        elapsed = time.monotonic() - start
        sent = srv.sent.get(path, 0)
    assert elapsed < max_s, f"{path}: {elapsed:.1f} s"
    assert ingest.failure_cause("failed_to_download" if error else "success", error) == cause
    if cause is None:
        assert stream.getvalue() == images[0][1]
    if path == "/huge":
        assert sent < 4 << 20  # refused from its Content-Length: the body was not read
    if path == "/endless":
        assert sent < 8 << 20  # the connection was dropped soon after the 1 MB cap


def test_failure_causes_of_bounded_downloads():
    """The bounded fetch's messages and urllib's redirect-loop error map to their own permanent
    or transient causes."""
    fc, retryable = ingest.failure_cause, ingest.is_retryable
    loop = (
        "HTTP Error 302: The HTTP server returned a redirect error that would lead to an infinite "
        "loop.\nThe last 30x error message was:\nFound"
    )
    assert fc("failed_to_download", loop) == "redirect_loop" and not retryable("x", loop)
    too_large = "too large: Content-Length 41943040 > max_image_bytes 20000000"
    assert fc("failed_to_download", too_large) == "too_large" and not retryable("x", too_large)
    deadline = "timed out: no complete response within the 60 s deadline"
    assert fc("failed_to_download", deadline) == "timeout" and retryable("x", deadline)


@pytest.mark.parametrize(("width", "height"), [(600, 1), (1, 3000), (60000, 1)])
def test_thin_images_refused_before_resize(width, height):
    """A thin image whose centre-crop resize would need more than the pixel budget (aspect ratio x
    image_size^2) is refused from its header as a decompression bomb, before OpenCV decodes or
    upscales it; an ordinary 4:3 image at the same size still resizes."""
    resizer = ingest.GuardedResizer(
        image_size=224, resize_mode="center_crop", resize_only_if_bigger=False,
        max_resize_pixels=ingest.MAX_RESIZE_PIXELS,
    )  # fmt: skip
    data = thin_png(width, height)
    assert len(data) < 1000
    img, *_, error = resizer(io.BytesIO(data))
    assert img is None and ingest.failure_cause("failed_to_resize", error) == "decompression_bomb"
    img, *_, error = resizer(io.BytesIO(thin_png(400, 300)))
    assert error is None and img is not None


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_ingest_of_hostile_list_is_bounded_and_keeps_every_good_image(tmp_path):
    """A list mixing good images with dripping, huge, endless, redirect-looping and thin-bomb URLs
    finishes in bounded time; each bad URL is counted under its cause and every good image is
    committed."""
    images = make_images(6, seed=12)
    bad = {
        "/drip": "timeout", "/drip-headers": "timeout", "/huge": "too_large",
        "/endless": "too_large", "/loop": "redirect_loop", "/thin/60000x1.png": "decompression_bomb",
    }  # fmt: skip
    with HostileServer(images) as srv:
        lines = ["url\tcaption"]
        for (name, _, caption), path in zip(images, [*bad, None], strict=False):
            lines.append(f"{srv.url('/img/' + name)}\t{caption}")
            if path:
                lines.append(f"{srv.url(path)}\tbad {path}")
        (tmp_path / "list.tsv").write_text("\n".join(lines) + "\n")
        config = ingest.IngestConfig(
            root=str(tmp_path / "root"), corpus="hostile", url_list=str(tmp_path / "list.tsv"),
            allow_private_hosts=True, image_size=32, threads=4, timeout=2, deadline=4,
            max_image_bytes=2_000_000,
        )  # fmt: skip
        start = time.monotonic()
        result = ingest.run(config)
        elapsed = time.monotonic() - start
    print(f"hostile ingest: {elapsed:.1f} s wall, downloads {result.download_s:.1f} s")
    assert result.failures == {
        "timeout": 2, "too_large": 2, "redirect_loop": 1, "decompression_bomb": 1,
    }  # fmt: skip
    assert result.successes == len(images) and result.exit_code == 0
    # One shard, 4 threads, 12 URLs: the slowest URL ends at its 4 s deadline (drips go on 90 s).
    assert result.download_s < 15, f"downloads took {result.download_s:.1f} s"
