"""PROXY protocol headers from the balancer's networks (docs/operations.md#behind-a-load-balancer):
the parser on its own, then the gateway over real sockets with hand-made headers.
tests/smtp/test_haproxy.py does the same through a real HAProxy."""

from __future__ import annotations

import base64
import ipaddress
import ssl
import struct
from pathlib import Path

import pytest
import trustme

from gateway.errors import ProxyHeaderError
from gateway.smtp import proxy_header
from gateway.smtp.proxy_header import ProxyHeader
from gateway.smtp.sasl import plain_response
from gateway.testing.device import FakeDevice
from gateway.testing.harness import gateway_with_upstream
from gateway.testing.issuer import TestIssuer
from gateway.testing.raw import RawSmtp

BALANCER = {"proxy_protocol_from": ["127.0.0.1/32"], "proxy_protocol_timeout": 0.5}


def v2(
    source: tuple[str, int] | None = ("192.0.2.7", 40000),
    destination: tuple[str, int] = ("198.51.100.1", 587),
    *,
    local: bool = False,
    tlvs: bytes = b"",
) -> bytes:
    """A v2 header as HAProxy's send-proxy-v2 writes it (s 2.2)."""
    if local or source is None:
        return proxy_header.V2_SIGNATURE + bytes([0x20, 0x00]) + struct.pack("!H", len(tlvs)) + tlvs
    src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
    family = 0x11 if src.version == 4 else 0x21
    body = src.packed + dst.packed + struct.pack("!HH", source[1], destination[1]) + tlvs
    return proxy_header.V2_SIGNATURE + bytes([0x21, family]) + struct.pack("!H", len(body)) + body


def parse(data: bytes) -> ProxyHeader:
    if proxy_header.version_of(data[: proxy_header.PREFIX_LENGTH]) == 1:
        return proxy_header.parse_v1(data)
    fixed = data[: proxy_header.V2_FIXED_LENGTH]
    return proxy_header.parse_v2(fixed, data[proxy_header.V2_FIXED_LENGTH :])


def test_v2_ipv4_ipv6_local_and_the_tls_flag() -> None:
    assert parse(v2()) == ProxyHeader(2, False, ("192.0.2.7", 40000), ("198.51.100.1", 587))
    six = parse(v2(("2001:db8::7", 1), ("2001:db8::1", 465)))
    assert six.source == ("2001:db8::7", 1)
    assert parse(v2(local=True)) == ProxyHeader(2, local=True)
    ssl_tlv = bytes([0x20]) + struct.pack("!H", 5) + bytes([0x01]) + b"\0\0\0\0"
    assert parse(v2(tlvs=ssl_tlv)).client_tls
    noop_tlv = bytes([0x04]) + struct.pack("!H", 2) + b"xx"  # PP2_TYPE_NOOP
    assert not parse(v2(tlvs=noop_tlv)).client_tls


def test_v1_lines() -> None:
    line = b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 587\r\n"
    assert parse(line) == ProxyHeader(1, False, ("192.0.2.7", 40000), ("198.51.100.1", 587))
    assert parse(b"PROXY UNKNOWN\r\n").local
    assert parse(b"PROXY TCP6 2001:db8::7 2001:db8::1 1 2\r\n").source == ("2001:db8::7", 1)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"EHLO x", "missing"),
        (b"\r\n\r\n\x00\rXXXXXXXXXX", "malformed"),  # the signature's start, then not
        (proxy_header.V2_SIGNATURE + b"\x11\x11" + struct.pack("!H", 12) + bytes(12), "malformed"),
        (proxy_header.V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", 60000), "oversized"),
        (
            proxy_header.V2_SIGNATURE + b"\x21\x31" + struct.pack("!H", 216) + bytes(216),
            "unsupported",
        ),
        (
            proxy_header.V2_SIGNATURE + b"\x21\x12" + struct.pack("!H", 12) + bytes(12),
            "unsupported",
        ),
        (proxy_header.V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", 4) + bytes(4), "malformed"),
        (v2(tlvs=b"\x04\x00\x09x"), "malformed"),  # a TLV longer than what is left
        (b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 0587\r\n", "malformed"),
        (b"PROXY TCP4 2001:db8::7 198.51.100.1 1 2\r\n", "malformed"),
        (b"PROXY TCP4 192.0.2.7 198.51.100.1 1\r\n", "malformed"),
        (b"PROXY TCP4 192.0.2.7 198.51.100.1 1 99999\r\n", "malformed"),
    ],
)
def test_bad_headers_are_typed_errors(data: bytes, reason: str) -> None:
    with pytest.raises(ProxyHeaderError) as caught:
        parse(data)
    assert caught.value.reason == reason


@pytest.fixture(scope="module")
def issuer() -> TestIssuer:
    return TestIssuer.generate("k1")


async def test_the_carried_address_counts_for_the_per_address_limit(
    tmp_path: Path, issuer: TestIssuer
) -> None:
    """All connections come from 127.0.0.1, the balancer; the limit of one per address
    refuses the second from 192.0.2.7 (its first is authenticated, so never shed) and
    admits 192.0.2.8."""
    async with (
        gateway_with_upstream(
            tmp_path, issuer, smtp=BALANCER, limits={"max_connections_per_ip": 1}
        ) as (gw, _),
        await RawSmtp.connect(gw.port) as first,
    ):
        await first.send(v2(("192.0.2.7", 1000)))
        assert (await first.reply())[0] == 220
        assert (await first.command("EHLO device.test"))[0] == 250
        blob = base64.b64encode(plain_response("alice@example.test", FakeDevice(issuer).token()))
        assert (await first.command(b"AUTH PLAIN " + blob))[0] == 235
        async with await RawSmtp.connect(gw.port) as second:
            await second.send(v2(("192.0.2.7", 1001)))
            assert (await second.reply())[0] == 421
            assert await second.closed()
        async with await RawSmtp.connect(gw.port) as other:
            await other.send(b"PROXY TCP4 192.0.2.8 198.51.100.1 1002 587\r\n")
            assert (await other.reply())[0] == 220
        assert (await first.command("NOOP"))[0] == 250


async def test_a_message_through_the_balancer_carries_the_phones_address(
    tmp_path: Path, issuer: TestIssuer
) -> None:
    async with (
        gateway_with_upstream(tmp_path, issuer, smtp=BALANCER) as (gw, _),
        await RawSmtp.connect(gw.port) as client,
    ):
        await client.send(v2(("192.0.2.7", 1000)))
        assert (await client.reply())[0] == 220
        assert (await client.command("EHLO device.test"))[0] == 250
        facts = next(iter(gw.server.sessions)).gsession().facts
        assert (facts.peer, facts.peer_ip) == ("[192.0.2.7]:1000", "192.0.2.7")


async def test_local_connections_keep_the_balancers_address(
    tmp_path: Path, issuer: TestIssuer
) -> None:
    async with (
        gateway_with_upstream(tmp_path, issuer, smtp=BALANCER) as (gw, _),
        await RawSmtp.connect(gw.port) as check,
    ):
        await check.send(v2(local=True))
        assert (await check.reply())[0] == 220
        assert (await check.command("HELO balancer"))[0] == 250
        assert next(iter(gw.server.sessions)).gsession().facts.peer_ip == "127.0.0.1"


@pytest.mark.parametrize(
    ("send", "reason"),
    [(b"EHLO device.test\r\n", "missing"), (b"", "timeout"), (b"PROXY TCP4 x\r\n", "malformed")],
)
async def test_a_balancer_connection_without_a_valid_header_is_closed_and_counted(
    tmp_path: Path, issuer: TestIssuer, send: bytes, reason: str
) -> None:
    async with gateway_with_upstream(tmp_path, issuer, smtp=BALANCER) as (gw, _):
        async with await RawSmtp.connect(gw.port) as client:
            if send:
                await client.send(send)
            assert await client.reply() == (0, "")  # closed without a word
        metrics = gw.server.services.metrics.render().decode()
        assert f'gateway_proxy_header_refusals_total{{reason="{reason}"}} 1.0' in metrics
        assert gw.server.connection_limits.open == 0


async def test_a_header_from_an_unlisted_address_is_smtp_garbage(
    tmp_path: Path, issuer: TestIssuer
) -> None:
    """Only the balancer may say who the client is: anyone else sending a header is a
    client talking before the greeting."""
    smtp = {"proxy_protocol_from": ["10.0.0.0/8"], "greeting_delay": 0.2}
    async with gateway_with_upstream(tmp_path, issuer, smtp=smtp) as (gw, _):
        async with await RawSmtp.connect(gw.port) as client:
            await client.send(v2(("192.0.2.7", 1000)))
            assert (await client.reply())[0] == 554
            assert await client.closed()
        phone = await FakeDevice(issuer).send(gw.port)
        assert phone.accepted


async def test_the_early_talker_check_sees_what_follows_the_header(
    tmp_path: Path, issuer: TestIssuer
) -> None:
    smtp = BALANCER | {"greeting_delay": 0.2}
    async with gateway_with_upstream(tmp_path, issuer, smtp=smtp) as (gw, _):
        async with await RawSmtp.connect(gw.port) as polite:
            await polite.send(v2())
            assert (await polite.reply())[0] == 220
        async with await RawSmtp.connect(gw.port) as talker:
            await talker.send(v2() + b"EHLO spam.test\r\n")
            assert (await talker.reply())[0] == 554
            assert await talker.closed()


async def test_implicit_tls_with_proxy_on_serves_clients_not_behind_the_balancer(
    tmp_path: Path, issuer: TestIssuer
) -> None:
    """With proxy_protocol_from set the implicit TLS listener leaves the handshake to the
    session (after a header, if one is due): a client from elsewhere still gets TLS at
    once, and one that sends no TLS at all is closed."""
    ca = trustme.CA()
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(
        str(tmp_path / "server.pem")
    )
    smtp = {
        "proxy_protocol_from": ["10.0.0.0/8"],
        "allow_plaintext_auth": False,
        "tls_cert": "server.pem",
        "tls_key": "server.pem",
        "implicit_tls_listen": "127.0.0.1:0",
    }
    context = ssl.create_default_context()
    ca.configure_trust(context)
    async with gateway_with_upstream(tmp_path, issuer, smtp=smtp) as (gw, upstream):
        assert gw.implicit_tls_port is not None
        result = await FakeDevice(issuer).send(
            gw.implicit_tls_port, implicit_tls=True, tls_context=context
        )
        assert result.accepted
        assert b"with ESMTPSA" in upstream.messages[0].content
        async with await RawSmtp.connect(gw.implicit_tls_port) as plain:
            await plain.send(b"EHLO device.test\r\n")
            assert await plain.closed()
