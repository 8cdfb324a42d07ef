"""Hostile SMTP input over real sockets: what no polite client sends must not get in.

Expected replies are the ones in the issue (brackets there, assertions here). Several
neighbours live elsewhere: SIZE= and after-dot 552 5.3.4, 452 4.5.3 and 530 5.7.0 in
tests/smtp/test_session.py; 500 5.5.6, bad base64 in tests/test_testing_kit.py; limits and
repeated errors in tests/smtp/test_limits.py.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trustme

from gateway.smtp.sasl import plain_response
from gateway.testing.device import FakeDevice
from gateway.testing.harness import RunningGateway, gateway_with_upstream
from gateway.testing.issuer import TestIssuer
from gateway.testing.raw import RawSmtp
from gateway.testing.upstream import FakeUpstream

# The public smtpsmug list of end-of-data look-alikes (and a NUL before the dot).
SMUGGLING = {
    "LF.LF": b"\n.\n",
    "LF.CRLF": b"\n.\r\n",
    "CR.CR": b"\r.\r",
    "CRLF.LF": b"\r\n.\n",
    "CR.CRLF": b"\r.\r\n",
    "CRLF.CR": b"\r\n.\r",
    "CRLF NUL.CRLF": b"\r\n\x00.\r\n",
}
SMUGGLED = (
    b"MAIL FROM:<ceo@example.test>\r\nRCPT TO:<victim@example.test>\r\nDATA\r\nwire money\r\n"
)


@pytest.fixture(scope="module")
def issuer() -> TestIssuer:
    return TestIssuer.generate("k1")


async def authenticated(gw: RunningGateway, issuer: TestIssuer) -> RawSmtp:
    client = await RawSmtp.connect(gw.port)
    assert (await client.reply())[0] == 220
    assert (await client.command("EHLO device.test"))[0] == 250
    blob = base64.b64encode(plain_response("alice@example.test", FakeDevice(issuer).token()))
    assert (await client.command(b"AUTH PLAIN " + blob))[0] == 235
    return client


async def start_data(client: RawSmtp) -> None:
    assert (await client.command("MAIL FROM:<alice@example.test>"))[0] == 250
    assert (await client.command("RCPT TO:<bob@example.test>"))[0] == 250
    assert (await client.command("DATA"))[0] == 354


@pytest.fixture
async def gateway(
    tmp_path: Path, issuer: TestIssuer
) -> AsyncIterator[tuple[RunningGateway, FakeUpstream]]:
    async with gateway_with_upstream(tmp_path, issuer) as pair:
        yield pair


@pytest.mark.parametrize("ending", SMUGGLING.values(), ids=SMUGGLING.keys())
async def test_smuggled_end_of_data_never_ends_data(
    gateway: tuple[RunningGateway, FakeUpstream], issuer: TestIssuer, ending: bytes
) -> None:
    gw, upstream = gateway
    client = await authenticated(gw, issuer)
    async with client:
        await start_data(client)
        await client.send(b"Subject: hi\r\n\r\nhello" + ending + SMUGGLED + b"\r\n.\r\n")
        code, text = await client.reply()
        if b"\x00" in ending:  # no bare CR or LF: one ordinary (odd) message
            assert (code, text) == (250, "2.0.0 Message accepted for delivery")
        else:
            assert (code, text) == (
                550,
                "5.5.2 Message contains bare CR or LF characters; use CRLF line endings",
            )
        # The smuggled commands were message text, never commands: the session is idle.
        assert await client.command("NOOP") == (250, "2.0.0 OK")
    await asyncio.sleep(0.1)
    assert all(m.recipients == ("bob@example.test",) for m in upstream.messages)
    assert len(upstream.messages) == (1 if b"\x00" in ending else 0)


async def test_bare_line_endings_can_be_normalised_instead(
    tmp_path: Path, issuer: TestIssuer
) -> None:
    async with gateway_with_upstream(tmp_path, issuer, smtp={"bare_linefeeds": "normalize"}) as (
        gw,
        upstream,
    ):
        client = await authenticated(gw, issuer)
        async with client:
            await start_data(client)
            await client.send(b"Subject: hi\r\n\r\nhello\n.\n" + SMUGGLED + b"\r\n.\r\n")
            assert (await client.reply())[0] == 250
        (message,) = upstream.messages
        assert message.recipients == ("bob@example.test",)
        body = message.content[message.content.index(b"Subject: hi") :]
        assert b"\n" not in body.replace(b"\r\n", b"")  # every line ending is CRLF now
        assert b"MAIL FROM:<ceo@example.test>" in body  # the "commands" are message text


async def test_talking_before_the_greeting_is_refused(tmp_path: Path, issuer: TestIssuer) -> None:
    async with (
        gateway_with_upstream(tmp_path, issuer, smtp={"greeting_delay": 0.3}) as (gw, _),
        await RawSmtp.connect(gw.port) as client,
    ):
        await client.send(b"EHLO early.test\r\n")
        assert await client.reply() == (
            554,
            "5.5.0 Protocol error: command sent before the server's reply",
        )
        assert await client.closed()


async def test_pipelining_before_the_ehlo_reply_is_refused(
    gateway: tuple[RunningGateway, FakeUpstream],
) -> None:
    gw, _ = gateway
    async with await RawSmtp.connect(gw.port) as client:
        assert (await client.reply())[0] == 220
        await client.send(b"EHLO fast.test\r\nMAIL FROM:<alice@example.test>\r\n")
        assert await client.reply() == (
            554,
            "5.5.0 Protocol error: command sent before the server's reply",
        )
        assert await client.closed()


async def test_starttls_injection_is_discarded(
    tmp_path: Path, issuer: TestIssuer, ca: trustme.CA
) -> None:
    """CVE-2011-0411 / CVE-2024-34083: plaintext after STARTTLS must not run after TLS."""
    cert = ca.issue_cert("gateway.test", "127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    smtp = {"allow_plaintext_auth": False, "tls_cert": "server.pem", "tls_key": "server.pem"}
    context = ssl.create_default_context()
    ca.configure_trust(context)
    async with (
        gateway_with_upstream(tmp_path, issuer, smtp=smtp) as (gw, _),
        await RawSmtp.connect(gw.port) as client,
    ):
        await client.reply()
        await client.command("EHLO device.test")
        await client.send(b"STARTTLS\r\nNOOP\r\n")  # NOOP is the injection
        assert (await client.reply())[0] == 220
        await client.start_tls(context, server_hostname="gateway.test")
        code, text = await client.command("EHLO device.test")
        assert code == 250
        assert (
            "AUTH OAUTHBEARER PLAIN XOAUTH2" in text
        )  # the EHLO reply, not a replayed NOOP's "OK"
        assert await client.command("NOOP") == (250, "2.0.0 OK")


async def test_first_command_right_after_the_handshake_is_answered(
    tmp_path: Path, issuer: TestIssuer, ca: trustme.CA
) -> None:
    """A command in the same TCP segment as the client's TLS Finished reaches the session
    before the upgrade returns: the injection defence must not discard it (a prototype of
    the loop-TLS STARTTLS did, and the client waited forever)."""
    cert = ca.issue_cert("gateway.test", "127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    smtp = {"allow_plaintext_auth": False, "tls_cert": "server.pem", "tls_key": "server.pem"}
    context = ssl.create_default_context()
    ca.configure_trust(context)
    async with (
        gateway_with_upstream(tmp_path, issuer, smtp=smtp) as (gw, _),
        await RawSmtp.connect(gw.port) as client,
    ):
        await client.reply()
        await client.command("EHLO device.test")
        assert (await client.command("STARTTLS"))[0] == 220
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = context.wrap_bio(incoming, outgoing, server_hostname="gateway.test")
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                await client.send(outgoing.read())
                incoming.write(await asyncio.wait_for(client.reader.read(65536), 5))
        tls.write(b"EHLO device.test\r\n")
        await client.send(outgoing.read())  # Finished and EHLO, one segment
        received = b""
        while b"250 HELP" not in received:
            incoming.write(await asyncio.wait_for(client.reader.read(65536), 5))
            with contextlib.suppress(ssl.SSLWantReadError):
                while chunk := tls.read(65536):
                    received += chunk
        assert b"AUTH OAUTHBEARER PLAIN XOAUTH2" in received


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


async def test_command_over_512_bytes(gateway: tuple[RunningGateway, FakeUpstream]) -> None:
    gw, _ = gateway
    async with await RawSmtp.connect(gw.port) as client:
        await client.reply()
        await client.command("EHLO device.test")
        assert await client.command("NOOP " + "x" * 600) == (500, "5.5.2 Command line too long")
        assert await client.command("MAIL FROM:<" + "a" * 600 + "@example.test>") == (
            500,
            "5.5.2 Command line too long",
        )
        assert (await client.command("NOOP"))[0] == 250  # the session goes on


async def test_data_line_over_1000_bytes_is_refused_never_truncated(
    gateway: tuple[RunningGateway, FakeUpstream], issuer: TestIssuer
) -> None:
    gw, upstream = gateway
    client = await authenticated(gw, issuer)
    async with client:
        await start_data(client)
        await client.send(b"Subject: long\r\n\r\n" + b"y" * 1200 + b"\r\n.\r\n")
        assert await client.reply() == (500, "5.5.2 Line too long (RFC 5321 s 4.5.3.1.6)")
        # 998 octets is the most a line may have: that passes, byte for byte.
        await start_data(client)
        await client.send(b"Subject: ok\r\n\r\n" + b"z" * 998 + b"\r\n.\r\n")
        assert (await client.reply())[0] == 250
    (message,) = upstream.messages
    assert b"z" * 998 + b"\r\n" in message.content


@pytest.mark.parametrize(
    ("command", "reply"),
    [
        ("AUTH PLAIN", (501, "5.7.0 Authentication aborted")),  # then "*"
        ("AUTH CRAM-MD5", (504, "5.5.4 Unrecognized authentication type")),
    ],
)
async def test_auth_cancel_and_unknown_mechanism(
    gateway: tuple[RunningGateway, FakeUpstream], command: str, reply: tuple[int, str]
) -> None:
    gw, _ = gateway
    async with await RawSmtp.connect(gw.port) as client:
        await client.reply()
        await client.command("EHLO device.test")
        code, text = await client.command(command)
        if code == 334:
            code, text = await client.command("*")
        assert (code, text) == reply


async def test_second_auth_is_refused(
    gateway: tuple[RunningGateway, FakeUpstream], issuer: TestIssuer
) -> None:
    gw, _ = gateway
    client = await authenticated(gw, issuer)
    async with client:
        blob = base64.b64encode(plain_response("alice@example.test", FakeDevice(issuer).token()))
        assert await client.command(b"AUTH PLAIN " + blob) == (503, "5.5.1 Already authenticated")


async def test_slow_drip_inside_data_meets_the_data_timeout(
    tmp_path: Path, issuer: TestIssuer
) -> None:
    async with gateway_with_upstream(tmp_path, issuer, smtp={"data_timeout": 1}) as (gw, upstream):
        client = await authenticated(gw, issuer)
        async with client:
            await start_data(client)
            loop = asyncio.get_running_loop()
            started = loop.time()
            for byte in b"Sub":  # a byte every 0.3 s, never a whole line
                await client.send(bytes([byte]))
                await asyncio.sleep(0.3)
            assert await client.reply(timeout=5) == (
                421,
                "4.4.2 Timeout exceeded, closing connection",
            )
            # Dripped bytes did not push the timeout out (1 s after the 354).
            assert loop.time() - started < 1.8
        assert upstream.messages == []


async def test_internal_errors_never_reach_the_client(
    gateway: tuple[RunningGateway, FakeUpstream],
    issuer: TestIssuer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gw, upstream = gateway

    async def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("secret internal detail /etc/gateway/keys")

    monkeypatch.setattr(gw.server.services.submission, "mail", broken)
    client = await authenticated(gw, issuer)
    async with client:
        code, text = await client.command("MAIL FROM:<alice@example.test>")
        assert (code, text) == (451, "4.3.0 Temporary internal error; please try again later")
        assert "secret" not in text
    assert upstream.messages == []
