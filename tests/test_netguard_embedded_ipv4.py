"""IPv6 addresses that carry an IPv4 address (issue 23, section 4A) are judged by what they carry,
at planning time (`check_url`) and at connect time (`guarded_create_connection`) alike.

Python 3.11's `ipaddress` calls 6to4 of 127.0.0.1 global, NAT64 reserved and Teredo private
whatever they carry, so each form is checked here both ways: an internal IPv4 inside is refused
(naming it), a public one (8.8.8.8) is allowed. Nothing here opens a socket: names resolve
through a fake resolver and `socket.create_connection` is replaced.
"""

from __future__ import annotations

import ipaddress
import socket
import urllib.error

import pytest

from pipelines import netguard


def teredo(server: str, client: str, port: int = 40000) -> str:
    """The Teredo address of a client behind NAT (RFC 4380: client address and port inverted)."""
    value = (
        0x2001_0000 << 96
        | int(ipaddress.IPv4Address(server)) << 64
        | 0x8000 << 48  # flags: cone NAT
        | (port ^ 0xFFFF) << 32
        | int(ipaddress.IPv4Address(client)) ^ 0xFFFFFFFF
    )
    return str(ipaddress.IPv6Address(value))


REFUSED = [
    pytest.param("2002:7f00:1::", "127.0.0.1", "loopback", id="6to4-loopback"),
    pytest.param("2002:a9fe:a9fe::", "169.254.169.254", "cloud metadata", id="6to4-metadata"),
    pytest.param("2002:a00:1::", "10.0.0.1", "private", id="6to4-private"),
    pytest.param("64:ff9b::10.0.0.1", "10.0.0.1", "private", id="nat64-private"),
    pytest.param("64:ff9b::127.0.0.1", "127.0.0.1", "loopback", id="nat64-loopback"),
    pytest.param("64:ff9b:1::10.0.0.1", "10.0.0.1", "private", id="nat64-local-use-96"),
    # 10.1.2.3 in the /48 layout, while the /56, /64 and /96 layouts read 1.2.3.8, 2.3.8.8 and
    # 8.8.8.8: a translator configured with a /48 prefix would reach 10.1.2.3.
    pytest.param("64:ff9b:1:a01:2:308:808:808", "10.1.2.3", "private", id="nat64-local-use-48"),
    pytest.param(teredo("65.54.227.120", "10.0.0.1"), "10.0.0.1", "private", id="teredo-client"),
    pytest.param(teredo("10.0.0.1", "8.8.8.8"), "10.0.0.1", "private", id="teredo-server"),
    pytest.param("::ffff:10.0.0.1", "10.0.0.1", "private", id="ipv4-mapped"),
    pytest.param("::169.254.169.254", "169.254.169.254", "metadata", id="ipv4-compatible"),
]
ALLOWED = [
    pytest.param("2002:808:808::", id="6to4"),
    pytest.param("64:ff9b::8.8.8.8", id="nat64"),
    pytest.param("64:ff9b:1:808:8:808:808:808", id="nat64-local-use"),  # 8.8.8.8 in every layout
    pytest.param(teredo("65.54.227.120", "8.8.8.8"), id="teredo"),
    pytest.param("::ffff:8.8.8.8", id="ipv4-mapped"),
]
METADATA = [
    pytest.param("2002:a9fe:a9fe::", id="6to4"),
    pytest.param("64:ff9b::169.254.169.254", id="nat64"),
    pytest.param("64:ff9b:1::169.254.169.254", id="nat64-local-use"),
    pytest.param(teredo("65.54.227.120", "169.254.169.254"), id="teredo"),
    pytest.param("::ffff:169.254.169.254", id="ipv4-mapped"),
    pytest.param("::169.254.169.254", id="ipv4-compatible"),
]


class FakeResolver:
    """getaddrinfo look-alike: every name resolves to the given IPv6 addresses."""

    def __init__(self, *ips: str) -> None:
        self.ips = ips

    def __call__(self, host, port, *args, **kwargs):
        return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", (ip, port, 0, 0)) for ip in self.ips]


@pytest.fixture
def connections(monkeypatch) -> list[tuple[str, int]]:
    """The addresses the guard connected to (recorded, never opened)."""
    made: list[tuple[str, int]] = []

    def record(address, *args, **kwargs):
        made.append(address)
        return socket.socket()  # unconnected: the guard only returns it

    monkeypatch.setattr(socket, "create_connection", record)
    return made


def test_teredo_helper_round_trips():
    """The test's Teredo builder gives addresses whose stdlib-decoded server and client are ours."""
    server, client = ipaddress.IPv6Address(teredo("65.54.227.120", "10.0.0.1")).teredo
    assert (str(server), str(client)) == ("65.54.227.120", "10.0.0.1")


def test_rfc6052_layouts_match_the_rfc_examples():
    """Each RFC 6052 layout reads 192.0.2.33 from the RFC's own example addresses (section 2.4)."""
    examples = {
        48: "2001:db8:122:c000:2:2100::",
        56: "2001:db8:122:3c0:0:221::",
        64: "2001:db8:122:344:c0:2:2100:0",
        96: "2001:db8:122:344::192.0.2.33",
    }
    for prefix_len, addr in examples.items():
        got = netguard._rfc6052_ipv4(ipaddress.IPv6Address(addr), prefix_len)
        assert str(got) == "192.0.2.33", prefix_len


@pytest.mark.parametrize(("addr", "embedded", "label"), REFUSED)
def test_internal_ipv4_inside_ipv6_is_refused_when_planning(addr, embedded, label):
    """A URL whose IPv6 host (literal or resolved) carries an internal IPv4 is refused at planning
    time with a cause naming that IPv4."""
    cause = netguard.check_url(f"http://[{addr}]/a.jpg")
    assert cause is not None and label in cause and f"{embedded} embedded in" in cause
    resolved = netguard.check_url("http://images.example/a.jpg", FakeResolver(addr))
    assert resolved is not None and f"{embedded} embedded in" in resolved


@pytest.mark.parametrize(("addr", "embedded", "label"), REFUSED)
def test_internal_ipv4_inside_ipv6_is_refused_at_connect_time(addr, embedded, label, connections):
    """The download workers' connection guard refuses the same addresses, literal or resolved
    (DNS rebinding), before opening any socket, naming the IPv4 they carry."""
    with pytest.raises(netguard.BlockedAddressError, match=f"{label}.*{embedded} embedded in"):
        netguard.guarded_create_connection((addr, 80))
    with pytest.raises(netguard.BlockedAddressError, match=f"{embedded} embedded in"):
        netguard.guarded_create_connection(("images.example", 80), resolver=FakeResolver(addr))
    assert connections == []


def test_guarded_opener_refuses_a_6to4_loopback_url(connections):
    """urllib's guarded opener refuses http://[6to4 of 127.0.0.1]/ without connecting."""
    with pytest.raises(urllib.error.URLError, match="127.0.0.1 embedded in"):
        netguard.guarded_opener().open("http://[2002:7f00:1::]/a.jpg", timeout=2)
    assert connections == []


@pytest.mark.parametrize("addr", ALLOWED)
def test_public_ipv4_inside_ipv6_is_allowed(addr, connections):
    """The same forms carrying a public IPv4 (8.8.8.8) pass both checks, and the guard connects to
    exactly the address it checked."""
    assert netguard.address_refusal(addr) is None
    assert netguard.check_url(f"http://[{addr}]/a.jpg") is None
    netguard.guarded_create_connection(("images.example", 80), resolver=FakeResolver(addr)).close()
    assert connections == [(addr, 80)]


@pytest.mark.parametrize("addr", METADATA)
def test_metadata_inside_ipv6_is_refused_even_with_allow_private_hosts(addr, connections):
    """allow_private_hosts lets internal IPv4s through inside IPv6 as it does bare, but never a
    cloud metadata address, at planning time or connect time."""
    cause = netguard.check_url(f"http://[{addr}]/a.jpg", allow_private_hosts=True)
    assert cause is not None and "cloud metadata address 169.254.169.254 embedded in" in cause
    with pytest.raises(netguard.BlockedAddressError, match="cloud metadata"):
        netguard.guarded_create_connection((addr, 80), allow_private_hosts=True)
    assert connections == []


@pytest.mark.parametrize(("addr", "embedded", "label"), REFUSED)
def test_allow_private_hosts_judges_embedded_ipv4_like_bare_ipv4(addr, embedded, label):
    """With allow_private_hosts an IPv6 form is refused exactly when its IPv4 would be bare."""
    bare = netguard.address_refusal(embedded, allow_private_hosts=True)
    wrapped = netguard.address_refusal(addr, allow_private_hosts=True)
    assert (bare is None) == (wrapped is None)


def test_local_use_nat64_with_zero_subnet_is_refused_unless_private_hosts_allowed():
    """A local-use NAT64 address carrying 8.8.8.8 only in its /96 layout is refused (its /64
    layout reads 0.0.0.8: the operator's prefix length is unknown), as a reserved address was
    before, and allowed with allow_private_hosts."""
    cause = netguard.address_refusal("64:ff9b:1::8.8.8.8")
    assert cause is not None and "0.0.0.8 embedded in" in cause
    assert netguard.address_refusal("64:ff9b:1::8.8.8.8", allow_private_hosts=True) is None


def test_plain_ipv6_is_still_judged_as_itself():
    """Addresses that carry no IPv4 keep their own verdicts: ::1, ::, fd00:ec2::254 refused,
    a global unicast address allowed."""
    assert "loopback" in netguard.address_refusal("::1")
    assert "unspecified" in netguard.address_refusal("::")
    assert "metadata" in netguard.address_refusal("fd00:ec2::254", allow_private_hosts=True)
    assert netguard.address_refusal("2606:2800:220:1:248:1893:25c8:1946") is None
