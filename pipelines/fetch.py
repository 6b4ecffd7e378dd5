"""Bounded downloads: one overall deadline and one byte cap per URL, in img2dataset's workers.

img2dataset 1.47's `download_image` passes `timeout` to `urlopen` (a limit per socket operation,
with no overall deadline) and reads the whole body with no size cap, so a server that drips a
byte every few tenths of a second holds a download thread for as long as it likes, and a huge or
endless body grows until the worker is killed (and a killed pool worker can hang img2dataset's
`imap_unordered`). `download_image` here is a drop-in replacement (same signature and return
value) that `pipelines.imagecheck.GuardedResizer` installs in every download worker:

- **Deadline** (`deadline_s`, `seedpipe ingest --deadline`): connect, TLS handshake, every redirect
  hop, the headers and the body of one URL together. Connections made while a deadline is active
  are registered with a per-process watchdog thread, which shuts their sockets down when it
  passes: a read blocked on a dripping server returns at once. Connects and handshakes also get
  at most the remaining time as their socket timeout. The sample fails with "timed out: ...",
  counted `timeout` (transient: `--retry-failed` re-attempts it).
- **Byte cap** (`max_bytes`, `--max-image-bytes`): a larger `Content-Length` is refused before
  any body byte is read; otherwise the body is read in chunks and refused as soon as it passes
  the cap. Counted `too_large` (permanent).
- Redirect loops keep urllib's message, counted `redirect_loop` (permanent).

The remaining unbounded step is the DNS look-up of each connection (`getaddrinfo` has no timeout).
Standard library only (plus img2dataset's X-Robots-Tag check): this module runs in every worker.
"""

from __future__ import annotations

import contextlib
import heapq
import io
import itertools
import socket
import threading
import time
import urllib.request
from collections.abc import Callable
from typing import Any

CHUNK_BYTES = 1 << 16
USER_AGENT = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"
"""img2dataset's user agent string."""


class DeadlineExceeded(TimeoutError):
    """The whole download of a URL took longer than its deadline."""


class TooLarge(Exception):
    """A body over the byte cap (announced by Content-Length or read)."""


class Deadline:
    """The end time of one URL's download and the sockets opened for it."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.at = time.monotonic() + seconds
        self.expired = False
        self._done = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()

    def remaining(self) -> float:
        return self.at - time.monotonic()

    def error(self) -> DeadlineExceeded:
        return DeadlineExceeded(
            f"timed out: no complete response within the {self.seconds:g} s deadline"
        )

    def attach(self, sock: socket.socket) -> None:
        """Watch `sock` (shut it down when the deadline passes)."""
        with self._lock:
            self._sockets.append(sock)
            expired = self.expired
        if expired:
            _shutdown(sock)

    def expire(self) -> None:
        """Called by the watchdog: wake every read blocked on this download's sockets."""
        with self._lock:
            if self._done:
                return
            self.expired = True
            sockets = list(self._sockets)
        for sock in sockets:
            _shutdown(sock)

    def close(self) -> None:
        with self._lock:
            self._done = True
            self._sockets.clear()


def _shutdown(sock: socket.socket) -> None:
    # socket.socket.shutdown, not SSLSocket.shutdown: only wake the reader, leave TLS state alone.
    # A socket that was closed meanwhile has fileno -1 and raises: nothing to wake then.
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


class _Watchdog:
    """One daemon thread per process that expires deadlines in time order."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, Deadline]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None

    def watch(self, deadline: Deadline) -> None:
        with self._cond:
            heapq.heappush(self._heap, (deadline.at, next(self._seq), deadline))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="fetch-deadlines", daemon=True
                )
                self._thread.start()
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap:
                    self._cond.wait()
                at, _, deadline = self._heap[0]
                wait = at - time.monotonic()
                if wait > 0:
                    self._cond.wait(wait)
                    continue
                heapq.heappop(self._heap)
            deadline.expire()


_WATCHDOG = _Watchdog()
_local = threading.local()


def current_deadline() -> Deadline | None:
    """The deadline of the download running in this thread, if any."""
    return getattr(_local, "deadline", None)


def connect_within_deadline(conn: Any, connect: Callable[[], None]) -> None:
    """A `netguard.guarded_opener` connect hook: bound connect + handshake by the remaining time,
    then hand the socket to the watchdog."""
    deadline = current_deadline()
    if deadline is None:
        connect()
        return
    remaining = deadline.remaining()
    if remaining <= 0:
        raise deadline.error()
    per_operation = conn.timeout
    bounded = isinstance(per_operation, int | float)
    conn.timeout = min(per_operation, remaining) if bounded else remaining
    try:
        connect()
    finally:
        conn.timeout = per_operation
    if bounded and conn.sock is not None:
        conn.sock.settimeout(per_operation)
    deadline.attach(conn.sock)


def fetch(
    url: str,
    *,
    timeout: float,
    deadline_s: float,
    max_bytes: int,
    headers: dict[str, str] | None = None,
    check: Callable[[Any], None] | None = None,
) -> bytes:
    """The body of `url` through urllib's installed opener, within `deadline_s` and `max_bytes`.

    `timeout` bounds each socket operation; `check(response)` may refuse a response by raising
    (before its body is read). Raises DeadlineExceeded, TooLarge, or urllib's errors.
    """
    deadline = Deadline(deadline_s)
    _local.deadline = deadline
    _WATCHDOG.watch(deadline)
    try:
        request = urllib.request.Request(url, data=None, headers=headers or {})
        with urllib.request.urlopen(request, timeout=min(timeout, deadline_s)) as response:
            if check is not None:
                check(response)
            length = (response.headers.get("Content-Length") or "").strip()
            if length.isdigit() and int(length) > max_bytes:
                raise TooLarge(
                    f"too large: Content-Length {int(length)} > max_image_bytes {max_bytes}"
                )
            body = bytearray()
            while chunk := response.read(min(CHUNK_BYTES, max_bytes + 1 - len(body))):
                body += chunk
                if len(body) > max_bytes:
                    raise TooLarge(f"too large: body over max_image_bytes {max_bytes}")
        if deadline.expired:  # a shut-down socket reads as a (short) end of body
            raise deadline.error()
        return bytes(body)
    except TooLarge:
        raise
    except Exception as err:
        if deadline.expired:
            raise deadline.error() from err
        raise
    finally:
        deadline.close()
        _local.deadline = None


def download_image(
    row: tuple[Any, str],
    timeout: float,
    user_agent_token: str | None,
    disallowed_header_directives: Any,
    *,
    deadline_s: float,
    max_bytes: int,
) -> tuple[Any, io.BytesIO | None, str | None]:
    """img2dataset's `download_image(row, timeout, user_agent_token, disallowed_header_directives)`,
    bounded: (key, stream, None) or (key, None, error message)."""
    from img2dataset.downloader import is_disallowed

    key, url = row
    agent = USER_AGENT
    if user_agent_token:
        agent += f" (compatible; {user_agent_token}; +https://github.com/rom1504/img2dataset)"

    def robots(response: Any) -> None:
        if disallowed_header_directives and is_disallowed(
            response.headers, user_agent_token, disallowed_header_directives
        ):
            raise PermissionError("Use of image disallowed by X-Robots-Tag directive")

    try:
        data = fetch(url, timeout=timeout, deadline_s=deadline_s, max_bytes=max_bytes,
                     headers={"User-Agent": agent}, check=robots)  # fmt: skip
    except Exception as err:  # noqa: BLE001 - every failure is one sample's error message
        return key, None, str(err)
    return key, io.BytesIO(data), None
