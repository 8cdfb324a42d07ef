"""Gateways behind a real HAProxy sending PROXY v2 (docs/operations.md#behind-a-load-balancer).

Fake phones connect from their own loopback addresses (127.0.0.2, 127.0.0.3) to HAProxy
on 127.0.0.1; HAProxy connects to the gateways from 127.0.0.1 too, so only the PROXY
header can tell the gateways who the phone is.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import ssl
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import structlog
import trustme

from gateway.ops import logs
from gateway.smtp.sasl import plain_response
from gateway.testing.device import FakeDevice
from gateway.testing.haproxy import (
    HaproxyUnavailable,
    TemporaryHaproxy,
    haproxy_binary,
    temporary_haproxy,
)
from gateway.testing.harness import RunningGateway, running_gateway, write_config
from gateway.testing.issuer import TestIssuer
from gateway.testing.raw import RawSmtp
from gateway.testing.upstream import FakeUpstream

pytestmark = pytest.mark.slow

PHONE_A, PHONE_B = "127.0.0.2", "127.0.0.3"


@pytest.fixture(scope="module")
def issuer() -> TestIssuer:
    return TestIssuer.generate("k1")


@pytest.fixture(autouse=True)
def _needs_haproxy() -> None:
    try:
        haproxy_binary()
    except HaproxyUnavailable as exc:
        pytest.skip(str(exc))


@asynccontextmanager
async def fleet(
    tmp_path: Path,
    issuer: TestIssuer,
    *,
    replicas: int = 2,
    balance: str = "roundrobin",
    smtp: dict[str, object] | None = None,
    limits: dict[str, object] | None = None,
    ca: trustme.CA | None = None,
    implicit_tls: bool = False,
    terminate_tls: bool = False,
    proxy: str = "send-proxy-v2",
) -> AsyncIterator[tuple[TemporaryHaproxy, list[RunningGateway], FakeUpstream, io.StringIO]]:
    """``replicas`` gateways (one upstream) behind one HAProxy backend, logs captured."""
    stream = io.StringIO()
    logs.configure("info", stream=stream)
    try:
        async with AsyncExitStack() as stack:
            upstream = await stack.enter_async_context(FakeUpstream.running())
            gateways = []
            settings: dict[str, object] = {"proxy_protocol_from": ["127.0.0.1/32"]}
            if ca is not None:  # STARTTLS, and implicit TLS on a second listener
                settings |= {"tls_cert": "server.pem", "tls_key": "server.pem"}
                settings |= {"implicit_tls_listen": "127.0.0.1:0", "allow_plaintext_auth": False}
            for n in range(replicas):
                directory = tmp_path / f"gw{n}"
                if ca is not None:
                    directory.mkdir(parents=True)
                    pem = ca.issue_cert("gateway.test").private_key_and_cert_chain_pem
                    pem.write_to_path(str(directory / "server.pem"))
                config = write_config(
                    directory,
                    issuer=issuer,
                    upstream_port=upstream.port,
                    smtp=settings | (smtp or {}),
                    limits=limits,
                )
                gateways.append(await stack.enter_async_context(running_gateway(config)))
            servers = [
                (gw.host, gw.implicit_tls_port if implicit_tls else gw.port)
                for gw in gateways
                if gw.implicit_tls_port is not None or not implicit_tls
            ]
            certificate = None
            if terminate_tls:
                assert ca is not None
                certificate = tmp_path / "haproxy.pem"
                pem = ca.issue_cert("gateway.test").private_key_and_cert_chain_pem
                pem.write_to_path(str(certificate))
            haproxy = await stack.enter_async_context(
                temporary_haproxy(
                    servers,
                    balance=balance,
                    check_tls=implicit_tls,
                    tls_certificate=certificate,
                    proxy=proxy,
                )
            )
            await haproxy.wait_up(replicas)
            yield haproxy, gateways, upstream, stream
    finally:
        structlog.reset_defaults()


def events(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.startswith("{")]


async def authenticated(port: int, source: str, issuer: TestIssuer) -> RawSmtp:
    client = await RawSmtp.connect(port, source=source)
    assert (await client.reply())[0] == 220
    assert (await client.command("EHLO device.test"))[0] == 250
    blob = base64.b64encode(plain_response("alice@example.test", FakeDevice(issuer).token()))
    assert (await client.command(b"AUTH PLAIN " + blob))[0] == 235
    return client


async def test_health_checks_mark_the_gateways_up_without_noise(
    tmp_path: Path, issuer: TestIssuer
) -> None:
    """check-send-proxy: HAProxy's SMTP checks arrive as PROXY LOCAL, get the greeting and
    a 250 to HELO; several rounds of them leave no warning or error in the log."""
    async with fleet(tmp_path, issuer, replicas=3) as (haproxy, gateways, _, stream):
        await asyncio.sleep(1.0)  # about five check rounds per server
        assert await haproxy.server_status() == {"g1": "UP", "g2": "UP", "g3": "UP"}
        metrics = [gw.server.services.metrics.render().decode() for gw in gateways]
    seen = events(stream)
    assert [e for e in seen if e["level"] in ("warning", "error", "critical")] == [
        e for e in seen if e["event"] == "plaintext_auth_enabled"
    ]
    assert not [e for e in seen if e["event"] == "proxy_header_refused"]
    for text in metrics:  # the checks reached every gateway, and every one was accepted
        assert float(text.split("\ngateway_sessions_total ")[1].split()[0]) >= 3
        assert "gateway_proxy_header_refusals_total{" not in text


async def test_per_address_limits_see_the_phones_not_haproxy(
    tmp_path: Path, issuer: TestIssuer
) -> None:
    """One connection per address and replica; HAProxy takes turns (round robin). Phone A
    holds one connection on each of the two replicas, its third is refused, and phone B,
    sent to a replica where A already has its share, is served. Without the PROXY header
    every connection would come from 127.0.0.1 and B would be refused too."""
    async with fleet(tmp_path, issuer, limits={"max_connections_per_ip": 1}) as (
        haproxy,
        gateways,
        upstream,
        _,
    ):
        first = await authenticated(haproxy.port, PHONE_A, issuer)
        second = await authenticated(haproxy.port, PHONE_A, issuer)  # N replicas x the limit
        async with first, second:
            assert [len(gw.server.sessions) for gw in gateways] == [1, 1]
            async with await RawSmtp.connect(haproxy.port, source=PHONE_A) as third:
                assert await third.reply() == (
                    421,
                    "4.7.0 Too many connections from your address; please try again later",
                )
            phone_b = await FakeDevice(issuer, user="bob@example.test").send(
                haproxy.port, source_address=PHONE_B
            )
            assert phone_b.accepted
            assert (await first.command("NOOP"))[0] == 250
        assert len(upstream.messages) == 1
        for gw in gateways:
            refusals = gw.server.services.metrics.render().decode()
            assert ('gateway_limit_refusals_total{limit="connections"} 1.0' in refusals) == (
                gw is gateways[0]
            )


async def test_the_per_user_message_rate_is_per_replica_so_n_replicas_admit_n_times_it(
    tmp_path: Path, issuer: TestIssuer
) -> None:
    """`messages_per_user_per_minute` is counted in each gateway's memory: with a limit of
    one and two replicas taking turns, one user gets two messages a minute through, one on
    each replica, and the third is refused (docs/operations.md, "Limits are per gateway")."""
    async with fleet(tmp_path, issuer, limits={"messages_per_user_per_minute": 1}) as (
        haproxy,
        gateways,
        upstream,
        _,
    ):
        alice = FakeDevice(issuer, user="alice@example.test")
        first = await alice.send(haproxy.port, source_address=PHONE_A)
        second = await alice.send(haproxy.port, source_address=PHONE_A)
        third = await alice.send(haproxy.port, source_address=PHONE_A)
    assert first.accepted
    assert second.accepted
    assert third.mail == (450, "4.7.1 Too many messages; please try again in a minute")
    assert len(upstream.messages) == 2
    for gw in gateways:  # one message on each replica; the third hit the first one's bucket
        refusals = gw.server.services.metrics.render().decode()
        assert ('gateway_limit_refusals_total{limit="messages_per_user"} 1.0' in refusals) == (
            gw is gateways[0]
        )


@pytest.mark.parametrize("proxy", ["send-proxy-v2", "send-proxy"])
async def test_received_header_and_decision_event_carry_the_phones_address(
    tmp_path: Path, issuer: TestIssuer, proxy: str
) -> None:
    """Version 2 (binary) and version 1 (text, HAProxy's send-proxy) alike."""
    async with fleet(tmp_path, issuer, proxy=proxy) as (haproxy, _, upstream, stream):
        for source in (PHONE_A, PHONE_B, PHONE_A, PHONE_B):  # round robin: both replicas
            result = await FakeDevice(issuer).send(haproxy.port, source_address=source)
            assert result.accepted
        received = [m.headers.split("\r\n")[0] for m in await upstream.wait_for(4)]
    assert sorted(received) == sorted(
        f"Received: from device.test ([{ip}])" for ip in (PHONE_A, PHONE_B, PHONE_A, PHONE_B)
    )
    decisions = [e for e in events(stream) if e["event"] == "decision"]
    assert sorted(e["client"] for e in decisions) == sorted([PHONE_A, PHONE_A, PHONE_B, PHONE_B])


async def test_the_early_talker_check_works_behind_haproxy(
    tmp_path: Path, issuer: TestIssuer
) -> None:
    """The PROXY header arrives before the greeting and is not early talk; what the phone
    sends before the greeting still is."""
    async with fleet(tmp_path, issuer, smtp={"greeting_delay": 0.3}) as (haproxy, _, _, stream):
        async with await RawSmtp.connect(haproxy.port, source=PHONE_A) as talker:
            await talker.send(b"EHLO spam.test\r\n")
            assert (await talker.reply())[0] == 554
            assert await talker.closed()
        polite = await FakeDevice(issuer).send(haproxy.port, source_address=PHONE_B)
        assert polite.accepted
    talkers = [e for e in events(stream) if e["event"] == "early_talker"]
    assert len(talkers) == 1


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    context.check_hostname = False  # the phones connect to 127.0.0.1; the name is gateway.test
    return context


async def test_starttls_behind_haproxy_keeps_the_phones_address(
    tmp_path: Path, issuer: TestIssuer, ca: trustme.CA
) -> None:
    """STARTTLS starts a new SMTP session (RFC 3207 s 4.2); it is still the phone's."""
    async with fleet(tmp_path, issuer, ca=ca) as (haproxy, _, upstream, _):
        for source in (PHONE_A, PHONE_B):
            result = await FakeDevice(issuer).send(
                haproxy.port, starttls=True, tls_context=client_context(ca), source_address=source
            )
            assert result.accepted
        messages = await upstream.wait_for(2)
    assert sorted(m.headers.split("\r\n")[0] for m in messages) == [
        f"Received: from device.test ([{PHONE_A}])",
        f"Received: from device.test ([{PHONE_B}])",
    ]
    assert all("with ESMTPSA" in m.headers for m in messages)


async def test_implicit_tls_behind_haproxy_reads_proxy_before_the_handshake(
    tmp_path: Path, issuer: TestIssuer, ca: trustme.CA
) -> None:
    """HAProxy passes the phone's TLS through (TCP mode) after its PROXY header; the
    gateway reads the header, then runs the handshake itself. HAProxy's own checks
    (check-ssl) do the same and mark both gateways UP."""
    async with fleet(tmp_path, issuer, ca=ca, implicit_tls=True) as (
        haproxy,
        _,
        upstream,
        stream,
    ):
        assert await haproxy.server_status() == {"g1": "UP", "g2": "UP"}
        for source in (PHONE_A, PHONE_B):
            result = await FakeDevice(issuer).send(
                haproxy.port,
                implicit_tls=True,
                tls_context=client_context(ca),
                source_address=source,
            )
            assert result.accepted
        messages = await upstream.wait_for(2)
    assert sorted(m.headers.split("\r\n")[0] for m in messages) == [
        f"Received: from device.test ([{PHONE_A}])",
        f"Received: from device.test ([{PHONE_B}])",
    ]
    assert all("with ESMTPSA" in m.headers for m in messages)
    assert not [e for e in events(stream) if e["level"] == "error"]


async def test_tls_terminated_at_haproxy_counts_as_tls_when_the_header_says_so(
    tmp_path: Path, issuer: TestIssuer, ca: trustme.CA
) -> None:
    """HAProxy ends the phone's TLS and forwards to the submission port with PROXY v2
    and its SSL TLV (proxy-v2-options ssl): the gateway offers AUTH there (plaintext AUTH
    is off) and records ESMTPSA. The same port, reached without the balancer's word, still
    does not offer AUTH before STARTTLS."""
    async with fleet(tmp_path, issuer, ca=ca, terminate_tls=True) as (haproxy, gws, upstream, _):
        result = await FakeDevice(issuer).send(
            haproxy.port, implicit_tls=True, tls_context=client_context(ca), source_address=PHONE_A
        )
        assert result.accepted
        messages = await upstream.wait_for(1)
        async with await RawSmtp.connect(gws[0].port) as direct:  # as a health check
            await direct.send(proxy_v2_local())
            assert (await direct.reply())[0] == 220
            code, text = await direct.command("EHLO device.test")
            assert code == 250
            assert "AUTH" not in text
            assert "STARTTLS" in text
    assert messages[0].headers.startswith(f"Received: from device.test ([{PHONE_A}])")
    assert "with ESMTPSA" in messages[0].headers


def proxy_v2_local() -> bytes:
    """What a health check sends: PROXY v2, LOCAL, no addresses."""
    return b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00"
