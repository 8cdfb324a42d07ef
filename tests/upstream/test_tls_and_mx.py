"""Upstream TLS modes with certificate verification, and MX routing through a real DNS server."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import cast

import dns.asyncresolver
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
import trustme

from gateway.testing.device import FakeDevice
from gateway.testing.harness import running_gateway, write_config
from gateway.testing.issuer import TestIssuer
from gateway.testing.upstream import FakeUpstream
from gateway.upstream.mx import NO_SUCH_DOMAIN, NULL_MX, MxRouter
from gateway.upstream.relay import Target


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def upstream_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    return context


def smarthost_config(
    tmp_path: Path, issuer: TestIssuer, port: int, tls: str, ca_file: str | None
) -> Path:
    config = write_config(tmp_path, issuer=issuer, upstream_port=port)
    text = config.read_text().replace(
        'tls = "none"', f'tls = "{tls}"' + (f'\nca_file = "{ca_file}"' if ca_file else "")
    )
    config.write_text(text)
    return config


@pytest.mark.parametrize("mode", ["starttls", "tls"])
async def test_upstream_tls_modes_verify_certificates(
    tmp_path: Path, ca: trustme.CA, mode: str
) -> None:
    issuer = TestIssuer.generate("k1")
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    async with FakeUpstream.running(upstream_context(ca), implicit_tls=mode == "tls") as upstream:
        config = smarthost_config(tmp_path, issuer, upstream.port, mode, "ca.pem")
        async with running_gateway(config) as gateway:
            result = await FakeDevice(issuer).send(gateway.port)
        assert result.data == (250, "2.0.0 Message accepted for delivery")
        assert len(upstream.messages) == 1


async def test_untrusted_upstream_certificate_is_refused(tmp_path: Path, ca: trustme.CA) -> None:
    issuer = TestIssuer.generate("k1")
    async with FakeUpstream.running(upstream_context(ca)) as upstream:
        config = smarthost_config(
            tmp_path, issuer, upstream.port, "starttls", None
        )  # system CAs only
        async with running_gateway(config) as gateway:
            result = await FakeDevice(issuer).send(gateway.port)
        assert result.mail is not None
        assert result.mail[0] == 451
        assert upstream.messages == []


class FakeDns(asyncio.DatagramProtocol):
    """A tiny authoritative DNS server on loopback UDP for MX tests."""

    def __init__(self, zone: dict[tuple[str, str], list[str]]) -> None:
        self.zone = zone
        self.queries = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        query = dns.message.from_wire(data)
        question = query.question[0]
        name = question.name.to_text().rstrip(".")
        rtype = dns.rdatatype.to_text(question.rdtype)
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if not any(key[0] == name for key in self.zone):
            response.set_rcode(dns.rcode.NXDOMAIN)
        elif (name, rtype) in self.zone:
            response.answer.append(
                dns.rrset.from_text_list(question.name, 300, "IN", rtype, self.zone[(name, rtype)])
            )
        self.queries += 1
        self.transport.sendto(response.to_wire(), addr)


@pytest.fixture
async def dns_server() -> AsyncIterator[tuple[FakeDns, dns.asyncresolver.Resolver]]:
    zone = {
        ("multi.test", "MX"): ["20 backup.multi.test.", "10 primary.multi.test."],
        ("implicit.test", "A"): ["127.0.0.1"],
        ("nullmx.test", "MX"): ["0 ."],
        ("example.test", "MX"): ["10 localhost."],  # resolves to loopback through /etc/hosts
    }
    protocol = FakeDns(zone)
    transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
        lambda: protocol, local_addr=("127.0.0.1", 0)
    )
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = ["127.0.0.1"]
    resolver.port = transport.get_extra_info("sockname")[1]
    resolver.lifetime = 2
    try:
        yield protocol, resolver
    finally:
        transport.close()


async def test_mx_preference_implicit_null_and_nxdomain(
    dns_server: tuple[FakeDns, dns.asyncresolver.Resolver],
) -> None:
    server, resolver = dns_server
    router = MxRouter(port=2525, resolver=resolver)
    assert [t.host for t in await router("multi.test")] == [
        "primary.multi.test",
        "backup.multi.test",
    ]  # type: ignore[union-attr]
    assert await router("implicit.test") == [Target("implicit.test", 2525, "opportunistic", False)]
    assert await router("nullmx.test") is NULL_MX
    assert await router("nowhere.test") is NO_SUCH_DOMAIN
    queries = server.queries
    await router("MULTI.test.")  # cached, case-blind
    assert server.queries == queries


async def test_gateway_in_mx_mode_delivers_by_dns(
    tmp_path: Path, dns_server: tuple[FakeDns, dns.asyncresolver.Resolver]
) -> None:
    """mode = "mx" end to end: the gateway asks the configured nameserver, delivers to the
    MX (opportunistic STARTTLS: this one offers none), and refuses null-MX and
    nonexistent domains at RCPT."""
    _, resolver = dns_server
    issuer = TestIssuer.generate("k1")
    async with FakeUpstream.running() as upstream:
        mx = {
            "mode": "mx",
            "mx_port": upstream.port,
            "nameservers": [f"127.0.0.1:{resolver.port}"],
        }
        config = write_config(tmp_path, issuer=issuer, upstream_port=upstream.port, upstream=mx)
        async with running_gateway(config) as gateway:
            result = await FakeDevice(issuer).send(
                gateway.port,
                recipients=["bob@example.test", "x@nullmx.test", "y@nowhere.test"],
            )
    assert result.rcpt == {
        "bob@example.test": (250, "2.1.5 upstream: OK"),
        "x@nullmx.test": (556, "5.1.10 Recipient domain does not accept mail (null MX, RFC 7505)"),
        "y@nowhere.test": (550, "5.1.2 Recipient domain does not exist"),
    }
    assert result.data is not None
    assert result.data[0] == 250
    (message,) = upstream.messages
    assert message.recipients == ("bob@example.test",)
