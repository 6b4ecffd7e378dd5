"""A synthetic image-caption corpus and a loopback HTTP server that serves it (tests, `seedpipe demo`).

- `make_images(n, seed)`: seeded JPEGs of simple coloured shapes on coloured backgrounds, with
  captions that describe them ("a red circle on a blue background"), so that a tokenizer or a
  captioner has something real to learn on a CPU in minutes.
- `make_scenes(n, seed, factors)`: the compositional corpus of `seedpipe demo`: shapes x colours x
  positions x backgrounds (`SceneFactors`), one shape per image at a jittered spot, captioned
  "a red circle at the top left on a white background"; `scene_captions(factors)` lists every
  caption the factors can produce.
- `ImageServer`: a `ThreadingHTTPServer` on 127.0.0.1 (port 0) serving those images from memory,
  plus the misbehaving paths the ingest must survive; it counts requests per path so that a test
  can assert the server saw no request at all.
- `write_url_list(path, rows, fmt)`: the same rows as tsv, csv, parquet or jsonl.

Server paths (all GET):
    /img/<name>        an image from `make_images` (image/jpeg)
    /flaky/<name>      HTTP 500 for the first `flaky_failures` requests of that path, then the image
    /redirect/<name>   302 to /img/<name>
    /redirect-to?url=U 302 to U (any target: for redirect-guard tests, never followed by the server)
    /403, /404, /500   those statuses
    /stall             sleeps `stall_s` seconds (ends by itself, or when the server stops), then
                       sends an image: longer than a test's download timeout
    /not-image         text bytes served as image/jpeg
    /truncated.jpg     a 96x96 JPEG cut in half
    /bomb.png          a ~100-byte PNG whose header declares `BOMB_SIDE` x `BOMB_SIDE` pixels
"""

from __future__ import annotations

import csv
import io
import json
import random
import struct
import threading
import zlib
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 40),
    "purple": (140, 40, 170),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle", "stripes")
BOMB_SIDE = 65_000
"""Declared side of /bomb.png: 4.2 gigapixels, above OpenCV's 2**30-pixel decode limit and PIL's."""


def _draw(shape: str, fg: tuple[int, int, int], bg: tuple[int, int, int], size: int) -> Image.Image:
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    m = size // 6
    if shape == "circle":
        d.ellipse([m, m, size - m, size - m], fill=fg)
    elif shape == "square":
        d.rectangle([m, m, size - m, size - m], fill=fg)
    elif shape == "triangle":
        d.polygon([(size // 2, m), (m, size - m), (size - m, size - m)], fill=fg)
    else:  # stripes
        step = max(2, size // 8)
        for x in range(0, size, 2 * step):
            d.rectangle([x, 0, x + step - 1, size], fill=fg)
    return img


def jpeg_bytes(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def make_images(n: int, seed: int = 0, size: int = 32) -> list[tuple[str, bytes, str]]:
    """n seeded (filename, jpeg_bytes, caption) triples; the caption names the shape and colours."""
    rng = random.Random(seed)
    names = list(COLORS)
    out = []
    for i in range(n):
        shape = SHAPES[rng.randrange(len(SHAPES))]
        fg, bg = rng.sample(names, 2)
        caption = f"a {fg} {shape} on a {bg} background"
        if shape == "stripes":
            caption = f"{fg} stripes on a {bg} background"
        out.append(
            (f"{i:05d}.jpg", jpeg_bytes(_draw(shape, COLORS[fg], COLORS[bg], size)), caption)
        )
    return out


SCENE_SHAPES = ("circle", "square", "triangle", "diamond", "ring", "cross")
"""Shapes `draw_scene` can draw."""
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.3, 0.3),
    "top right": (0.7, 0.3),
    "bottom left": (0.3, 0.7),
    "bottom right": (0.7, 0.7),
    "center": (0.5, 0.5),
}
"""Where a scene's shape sits: name -> centre as a fraction of the image side."""
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
    "brown": (120, 72, 30),
}
"""Scene backgrounds: a palette of their own, so a shape never has its background's colour."""


@dataclass(frozen=True, kw_only=True)
class SceneFactors:
    """The factors `make_scenes` draws from (names of SCENE_SHAPES, COLORS, POSITIONS, BACKGROUNDS)."""

    shapes: tuple[str, ...] = ("square", "triangle", "ring", "cross")
    """Why not circle and diamond: at 32 pixels a random-init ViT's tokens barely tell a circle
    from a square or a diamond from a triangle (plain-torch stage 1, 1,500 steps: the top retrieved
    caption had the right one of circle/square/triangle/diamond for 0.67-0.76 of held-out images,
    of this set 0.91-0.95; circle/square and diamond/triangle were the confusions)."""
    colors: tuple[str, ...] = ("red", "green", "blue", "yellow")
    positions: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right")
    backgrounds: tuple[str, ...] = ("white", "black", "gray")
    scale: float = 0.3
    """Shape radius as a fraction of the image side (0.3: about 10 of 32 pixels, 2-3 ViT patches)."""
    jitter: float = 0.04
    """Uniform jitter of the centre and radius, as a fraction of the side."""

    def __post_init__(self) -> None:
        for name, values, known in (("shapes", self.shapes, SCENE_SHAPES), ("colors", self.colors, COLORS),
                                    ("positions", self.positions, POSITIONS),
                                    ("backgrounds", self.backgrounds, BACKGROUNDS)):  # fmt: skip
            unknown = [v for v in values if v not in known]
            if not values or unknown:
                raise ValueError(
                    f"SceneFactors.{name} must be a non-empty subset of {list(known)}, got {list(values)}"
                )
        if not 0.05 <= self.scale <= 0.5 or not 0.0 <= self.jitter < self.scale:
            raise ValueError(f"SceneFactors: scale must be in [0.05, 0.5] and jitter in [0, scale), "
                             f"got {self.scale}, {self.jitter}")  # fmt: skip

    @property
    def num_captions(self) -> int:
        return len(self.shapes) * len(self.colors) * len(self.positions) * len(self.backgrounds)


def scene_caption(shape: str, color: str, position: str, background: str) -> str:
    where = "in the center" if position == "center" else f"at the {position}"
    return f"a {color} {shape} {where} on a {background} background"


def scene_captions(factors: SceneFactors = SceneFactors()) -> list[str]:
    """Every caption `make_scenes(..., factors)` can produce, in factor order."""
    return [scene_caption(s, c, p, b) for s in factors.shapes for c in factors.colors
            for p in factors.positions for b in factors.backgrounds]  # fmt: skip


def draw_scene(shape: str, color: str, position: str, background: str, *, size: int = 32,
               factors: SceneFactors = SceneFactors(), rng: random.Random | None = None) -> Image.Image:  # fmt: skip
    """One scene: `shape` in `color` around `position` (jittered by `rng`) on `background`."""
    rng = rng or random.Random(0)
    img = Image.new("RGB", (size, size), BACKGROUNDS[background])
    d = ImageDraw.Draw(img)
    fx, fy = POSITIONS[position]
    j = factors.jitter
    cx, cy = (fx + rng.uniform(-j, j)) * size, (fy + rng.uniform(-j, j)) * size
    r = (factors.scale + rng.uniform(-j, j) / 2) * size
    fill = COLORS[color]
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        s = r * 0.9
        d.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)
    elif shape == "ring":  # an outline a third of the radius thick
        d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=max(1, round(r / 3)))
    elif shape == "cross":  # a plus sign whose arms are 2/3 of the radius wide
        w = r / 3
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    else:  # diamond
        d.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    return img


def make_scenes(n: int, seed: int = 0, size: int = 32, factors: SceneFactors = SceneFactors(),
                ) -> list[tuple[str, bytes, str]]:  # fmt: skip
    """n seeded (filename, jpeg_bytes, caption) compositional scenes: each factor drawn uniformly."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        shape, color, position, background = (rng.choice(f) for f in (
            factors.shapes, factors.colors, factors.positions, factors.backgrounds))  # fmt: skip
        img = draw_scene(shape, color, position, background, size=size, factors=factors, rng=rng)
        out.append(
            (f"{i:05d}.jpg", jpeg_bytes(img), scene_caption(shape, color, position, background))
        )
    return out


def truncated_jpeg() -> bytes:
    """A 96x96 JPEG with its second half (and its end-of-image marker) cut off."""
    data = jpeg_bytes(_draw("circle", COLORS["red"], COLORS["blue"], 96))
    return data[: len(data) // 2]


def bomb_png(side: int = BOMB_SIDE) -> bytes:
    """A tiny PNG whose IHDR declares side x side 8-bit greyscale pixels (a decompression bomb)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        body = kind + payload
        return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (side + 1) * 4, 9)  # a few rows of zeros; the rest is "missing"
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


class ImageServer:
    """Serve `images` (from `make_images`) and the test paths on 127.0.0.1; a context manager.

    `stall_s` bounds /stall; `flaky_failures` is how many times each /flaky/<name> path answers 500
    before it serves the image. `requests` counts requests per path (query string removed).
    """

    def __init__(
        self,
        images: Iterable[tuple[str, bytes, str]] = (),
        *,
        stall_s: float = 4.0,
        flaky_failures: int = 1,
    ) -> None:
        self.images = {name: data for name, data, _ in images}
        self.stall_s = stall_s
        self.flaky_failures = flaky_failures
        self.requests: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._extra = {
            "/not-image": b"this is not an image, only text pretending to be one\n" * 4,
            "/truncated.jpg": truncated_jpeg(),
            "/bomb.png": bomb_png(),
        }

    # ---- lifecycle -----------------------------------------------------------------------
    def start(self) -> ImageServer:
        handler = type("Handler", (_Handler,), {"owner": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()  # releases /stall sleepers
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> ImageServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- helpers -------------------------------------------------------------------------
    @property
    def port(self) -> int:
        assert self._server is not None, "server not started"
        return self._server.server_address[1]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def image_url(self, name: str) -> str:
        return self.url(f"/img/{name}")

    @property
    def total_requests(self) -> int:
        with self._lock:
            return sum(self.requests.values())

    def _count(self, path: str) -> int:
        with self._lock:
            self.requests[path] += 1
            return self.requests[path]


class _Handler(BaseHTTPRequestHandler):
    owner: ImageServer
    protocol_version = "HTTP/1.0"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _send(self, status: int, body: bytes = b"", ctype: str = "text/plain", **headers: str):
        try:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (e.g. after its timeout): nothing to do

    def do_GET(self) -> None:
        owner = self.owner
        parts = urlsplit(self.path)
        path = parts.path
        seen = owner._count(path)
        if path.startswith("/img/") and path[5:] in owner.images:
            self._send(200, owner.images[path[5:]], "image/jpeg")
        elif path.startswith("/flaky/") and path[7:] in owner.images:
            if seen <= owner.flaky_failures:
                self._send(500, b"flaky: try again later")
            else:
                self._send(200, owner.images[path[7:]], "image/jpeg")
        elif path.startswith("/redirect/"):
            self._send(302, b"", Location=f"/img/{path[10:]}")
        elif path == "/redirect-to":
            target = parse_qs(parts.query).get("url", [""])[0]
            self._send(302, b"", Location=target)
        elif path == "/403":
            self._send(403, b"forbidden")
        elif path == "/500":
            self._send(500, b"internal error")
        elif path == "/stall":
            owner._stop.wait(owner.stall_s)
            self._send(200, next(iter(owner.images.values()), b""), "image/jpeg")
        elif path in owner._extra:
            ctype = "image/png" if path.endswith(".png") else "image/jpeg"
            self._send(200, owner._extra[path], ctype)
        else:
            self._send(404, b"not found")


def write_url_list(
    path: str | Path,
    rows: Iterable[Mapping[str, str] | Sequence[str]],
    fmt: str,
    *,
    columns: Sequence[str] = ("url", "caption"),
    header: bool = True,
) -> Path:
    """Write rows (mappings, or sequences in `columns` order) as tsv, csv, parquet or jsonl.

    `header=False` omits the header line of tsv/csv (the CC3M/CC12M layout); parquet and jsonl
    always name their columns.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    records = [
        dict(r) if isinstance(r, Mapping) else dict(zip(columns, r, strict=True)) for r in rows
    ]
    if fmt == "tsv":  # unquoted, like the CC3M/CC12M files: a value cannot hold a tab or newline
        lines = [list(columns)] if header else []
        lines += [[str(r.get(c) or "") for c in columns] for r in records]
        if any(ch in v for line in lines for v in line for ch in "\t\r\n"):
            raise ValueError("tsv values cannot contain tabs or newlines")
        path.write_text("".join("\t".join(line) + "\n" for line in lines), encoding="utf-8")
    elif fmt == "csv":
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            if header:
                writer.writerow(columns)
            for r in records:
                writer.writerow([r.get(c, "") for c in columns])
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({c: [r.get(c) for r in records] for c in columns}), path)
    elif fmt == "jsonl":
        with open(path, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps({c: r.get(c) for c in columns}) + "\n")
    else:
        raise ValueError(f"fmt must be one of tsv, csv, parquet, jsonl; got {fmt!r}")
    return path
