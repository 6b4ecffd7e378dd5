"""The address filter: which hosts a URL list may make ingest fetch from.

Rule: refuse a host that is, or resolves to, a loopback, private, link-local, reserved,
unspecified, multicast or otherwise non-global address, unless `allow_private_hosts` (demos,
tests). Cloud metadata endpoints (169.254.169.254, fd00:ec2::254, metadata.google.internal, ...)
are refused even then: no URL list needs them.

Design choices (a URL list is untrusted input):
- The rule is applied twice. At planning time (`host_refusals`, `check_url`) each distinct
  host:port is resolved once and a refused row is counted `blocked_address` and never sent; a
  name that does not resolve is not refused then (its download fails and is counted later). At
  connect time, because img2dataset 1.47 downloads with `urllib.request.urlopen`, which follows
  HTTP redirects (no option turns that off) and resolves names again (DNS rebinding):
  `guarded_opener` builds a urllib opener whose connections resolve once, check every address,
  then connect to exactly the addresses checked, on every redirect hop, refusing with
  `BlockedAddressError("blocked address: ...")`. It also drops urllib's ftp:// and file://
  handlers.
- IPv6 forms that carry an IPv4 address are judged by it (`embedded_ipv4`), since Python's
  `ipaddress` calls e.g. 6to4 of 127.0.0.1 global: IPv4-mapped (::ffff:0:0/96), 6to4
  (2002::/16), NAT64 (64:ff9b::/96, last 32 bits), Teredo (2001::/32: server and de-obfuscated
  client), and the deprecated IPv4-compatible (::/96) and IPv4-translated (::ffff:0:0:0/96). If
  any carried IPv4 is refused the IPv6 address is, naming it. For the NAT64 local-use prefix
  64:ff9b:1::/48 (RFC 8215) the operator picks the prefix length, which a URL list cannot tell
  us, so every RFC 6052 layout it allows (/48, /56, /64, /96) is judged and all must pass: an
  address carrying a public IPv4 only in its /96 layout (zeros elsewhere) is refused, its other
  layouts carrying 0.0.0.x, unless `allow_private_hosts` (such addresses were refused as reserved
  before). Translation forms are then allowed when what they carry is; the deprecated forms must
  also pass as IPv6 addresses (they are reserved). 6rd and ISATAP embed an IPv4 at operator-chosen places and are
  judged as plain IPv6. IPv6 zone ids are dropped.
- Resolution goes through a `resolver` argument (default `socket.getaddrinfo`), so every decision
  can be made in tests with a fake and no network traffic.
- The remaining gap: with an HTTP(S) proxy configured in the environment, the connect-time check
  sees the proxy's address, not the target's; the proxy itself must refuse internal targets.
- Standard library only: this module is imported in every download worker.
"""

from __future__ import annotations

import functools
import http.client
import ipaddress
import socket
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import SplitResult, urlsplit

METADATA_HOSTS = frozenset(
    {"metadata.google.internal", "metadata.goog", "metadata", "metadata.azure.internal",
     "instance-data", "instance-data.ec2.internal"}
)  # fmt: skip
METADATA_IPS = frozenset(
    {"169.254.169.254", "169.254.170.2", "fd00:ec2::254", "100.100.100.200", "168.63.129.16"}
)

Resolver = Callable[..., Iterable[Any]]
"""`socket.getaddrinfo` or a look-alike: (host, port, family, type) -> address infos."""


class BlockedAddressError(OSError):
    """A connection to a refused address (raised inside download workers, before connecting)."""


_NAT64_WELL_KNOWN = ipaddress.IPv6Network("64:ff9b::/96")
_NAT64_LOCAL_USE = ipaddress.IPv6Network("64:ff9b:1::/48")
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")
_IPV4_TRANSLATED = ipaddress.IPv6Network("::ffff:0:0:0/96")
_LOCAL_USE_LAYOUTS = (96, 64, 56, 48)
"""RFC 6052 prefix lengths that fit in 64:ff9b:1::/48; /96 first, so a refusal names the usual one."""


def _rfc6052_ipv4(addr: ipaddress.IPv6Address, prefix_len: int) -> ipaddress.IPv4Address:
    """The IPv4 address in `addr` under an RFC 6052 prefix of `prefix_len` bits: the 32 bits after
    the prefix, skipping bits 64-71 (the "u" octet, which RFC 6052 keeps out of every layout)."""
    value = int(addr)
    without_u = ((value >> 64) << 56) | (value & ((1 << 56) - 1))  # bits 0-63, 72-127
    start = prefix_len if prefix_len <= 64 else prefix_len - 8
    return ipaddress.IPv4Address(without_u >> (120 - start - 32) & 0xFFFFFFFF)


def embedded_ipv4(
    addr: ipaddress.IPv6Address,
) -> tuple[list[tuple[str, ipaddress.IPv4Address]], bool]:
    """The IPv4 addresses an IPv6 address carries, each with its form's name, and whether the
    IPv6 address must still pass as itself.

    A translation or tunnel form reaches what it carries, so only that is judged (the stdlib
    calls NAT64 reserved and Teredo private whatever they carry); the deprecated compatible and
    translated forms have no use today, so they must pass both ways.
    """
    last32 = ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    if addr.ipv4_mapped is not None:
        return [("IPv4-mapped", addr.ipv4_mapped)], False
    if addr.sixtofour is not None:
        return [("6to4", addr.sixtofour)], False
    if addr.teredo is not None:
        server, client = addr.teredo
        return [("Teredo client", client), ("Teredo server", server)], False
    if addr in _NAT64_WELL_KNOWN:
        return [("NAT64", last32)], False
    if addr in _NAT64_LOCAL_USE:
        layouts = [(f"NAT64 local-use /{n}", _rfc6052_ipv4(addr, n)) for n in _LOCAL_USE_LAYOUTS]
        return layouts, False
    if addr in _IPV4_TRANSLATED:
        return [("IPv4-translated", last32)], True
    if addr in _IPV4_COMPATIBLE and int(addr) > 1:  # not :: or ::1, which are themselves
        return [("IPv4-compatible", last32)], True
    return [], True


def _own_refusal(
    addr: ipaddress.IPv4Address | ipaddress.IPv6Address, allow_private: bool
) -> str | None:
    if str(addr) in METADATA_IPS:
        return f"cloud metadata address {addr}"
    if allow_private:
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


def address_refusal(ip: str, *, allow_private_hosts: bool = False) -> str | None:
    """Why an IP address must not be fetched from, or None. Metadata addresses are always refused,
    also when an IPv6 address carries one (`embedded_ipv4`)."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])  # drop an IPv6 zone id
    if isinstance(addr, ipaddress.IPv6Address):
        carried, judge_itself = embedded_ipv4(addr)
        for form, ipv4 in carried:
            if cause := _own_refusal(ipv4, allow_private_hosts):
                return f"{cause} embedded in {addr} ({form})"
        if not judge_itself:
            return None
    return _own_refusal(addr, allow_private_hosts)


def literal_ip(host: str) -> str | None:
    """The address a host names literally (an IP, not a name), or None."""
    try:
        return str(ipaddress.ip_address(host.split("%", 1)[0]))
    except ValueError:
        return None


def _metadata_host_refusal(host: str) -> str | None:
    name = host.lower().rstrip(".")
    return f"cloud metadata host {name}" if name in METADATA_HOSTS else None


def _resolved_ips(host: str, port: int, resolver: Resolver) -> list[str]:
    infos = resolver(host, port, 0, socket.SOCK_STREAM)
    return [info[4][0] if isinstance(info, tuple) else str(info) for info in infos]


def _first_refusal(ips: Iterable[str], *, allow_private_hosts: bool) -> str | None:
    for ip in ips:
        if cause := address_refusal(ip, allow_private_hosts=allow_private_hosts):
            return cause
    return None


def _port(parts: SplitResult) -> int:
    return parts.port or (443 if parts.scheme == "https" else 80)


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
    if cause := _metadata_host_refusal(host):
        return cause
    host = host.lower().rstrip(".")
    if (ip := literal_ip(host)) is not None:
        return address_refusal(ip, allow_private_hosts=allow_private_hosts)
    try:
        ips = _resolved_ips(host, port, resolver)
    except (OSError, UnicodeError):
        return None
    if cause := _first_refusal(ips, allow_private_hosts=allow_private_hosts):
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
        port = _port(parts)
    except ValueError as err:
        return f"malformed url: {err}"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "malformed url: not an http(s) URL with a host"
    return host_refusal(parts.hostname, port, resolver, allow_private_hosts=allow_private_hosts)


def host_refusals(
    urls: Sequence[str],
    *,
    allow_private_hosts: bool,
    resolver: Resolver | None = None,
    threads: int = 16,
) -> list[str | None]:
    """The refusal cause of each (well-formed) URL's host, or None; each distinct host:port is
    decided once, `threads` look-ups at a time.

    With `allow_private_hosts` only literals and metadata names can be refused, so nothing is
    resolved here (the download workers' connection guard still checks every address).
    """
    resolver = _unresolved if allow_private_hosts else (resolver or socket.getaddrinfo)
    keys = []
    for url in urls:
        parts = urlsplit(url)
        keys.append(((parts.hostname or "").lower(), _port(parts)))
    hosts = list(dict.fromkeys(keys))

    def decide(key: tuple[str, int]) -> str | None:
        return host_refusal(*key, resolver, allow_private_hosts=allow_private_hosts)

    with ThreadPoolExecutor(max(1, min(threads, len(hosts)))) as pool:
        causes = dict(zip(hosts, pool.map(decide, hosts), strict=True))
    return [causes[k] for k in keys]


def _unresolved(host: str, *args: Any) -> list[Any]:
    raise socket.gaierror(f"{host}: not resolved at planning time")


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
    if cause := _metadata_host_refusal(host):
        raise BlockedAddressError(f"blocked address: {cause}")
    literal = literal_ip(host)
    ips = [literal] if literal else list(dict.fromkeys(_resolved_ips(host, port, resolver)))
    if cause := _first_refusal(ips, allow_private_hosts=allow_private_hosts):
        raise BlockedAddressError(f"blocked address: {host} -> {cause}")
    error: OSError | None = None
    for ip in ips:
        try:
            return socket.create_connection((ip, port), timeout, source_address)
        except OSError as err:
            error = err
    raise error or OSError(f"could not connect to {host}:{port}")


def guarded_opener(
    *,
    allow_private_hosts: bool = False,
    connect_hook: Callable[[http.client.HTTPConnection, Callable[[], None]], None] | None = None,
) -> urllib.request.OpenerDirector:
    """A urllib opener for http(s) only, whose every connection (redirects included) is checked.

    `connect_hook(connection, connect)`, if given, runs each connection's `connect` (e.g.
    `pipelines.fetch.connect_within_deadline`, which bounds it in time and watches the socket).
    """
    connect = functools.partial(guarded_create_connection, allow_private_hosts=allow_private_hosts)

    def hooked(conn: http.client.HTTPConnection, parent_connect: Callable[[], None]) -> None:
        if connect_hook is None:
            parent_connect()
        else:
            connect_hook(conn, parent_connect)

    class GuardedHTTPConnection(http.client.HTTPConnection):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._create_connection = connect

        def connect(self) -> None:
            hooked(self, super().connect)

    class GuardedHTTPSConnection(http.client.HTTPSConnection):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._create_connection = connect

        def connect(self) -> None:
            hooked(self, super().connect)

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
