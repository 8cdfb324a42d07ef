"""The gateway over real sockets: devices authenticate, decisions are enforced, mail goes upstream."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import aiosmtplib
import pytest
import trustme

from gateway.hold.store import held_rows
from gateway.testing.device import FakeDevice, make_message
from gateway.testing.harness import (
    RunningGateway,
    gateway_with_upstream,
    running_gateway,
    write_config,
)
from gateway.testing.issuer import TestIssuer
from gateway.testing.raw import RawSmtp
from gateway.testing.upstream import FakeUpstream

MECHANISMS = ["PLAIN", "XOAUTH2", "OAUTHBEARER"]


def user_policy(action: str) -> str:
    return f"""
[[policy]]
id = "{action}-policy"
match.users = ["{action}@example.test"]
action = "{action}"
message = "Policy says {action}."
"""


POLICIES = {f"{a}.toml": user_policy(a) for a in ("warn", "defer", "hold", "reject")}


@pytest.fixture(scope="module")
def issuer() -> TestIssuer:
    return TestIssuer.generate("k1")


@pytest.fixture
async def gateway(
    tmp_path: Path, issuer: TestIssuer
) -> AsyncIterator[tuple[RunningGateway, FakeUpstream]]:
    async with gateway_with_upstream(tmp_path, issuer, POLICIES) as pair:
        yield pair


@pytest.mark.parametrize("mechanism", MECHANISMS)
async def test_allow_relays_upstream(
    gateway: tuple[RunningGateway, FakeUpstream], issuer: TestIssuer, mechanism: str
) -> None:
    gw, upstream = gateway
    result = await FakeDevice(issuer, user="alice@example.test").send(gw.port, mechanism=mechanism)
    assert result.auth == (235, "2.7.0 Authentication successful")
    assert result.data == (250, "2.0.0 Message accepted for delivery")
    (message,) = upstream.messages
    assert message.sender == "alice@example.test"
    assert message.recipients == ("bob@example.test",)


@pytest.mark.parametrize("mechanism", MECHANISMS)
async def test_warn_relays_with_notice(
    gateway: tuple[RunningGateway, FakeUpstream], issuer: TestIssuer, mechanism: str
) -> None:
    gw, upstream = gateway
    result = await FakeDevice(issuer, user="warn@example.test").send(gw.port, mechanism=mechanism)
    assert result.data == (250, "2.0.0 Message accepted. NOTICE: Policy says warn.")
    (message,) = upstream.messages
    assert "X-Compliance-Notice: warn-policy; Policy says warn." in message.headers


@pytest.mark.parametrize("mechanism", MECHANISMS)
@pytest.mark.parametrize(
    ("user", "reply"),
    [
        ("defer@example.test", (451, "4.7.1 Policy says defer.")),
        ("reject@example.test", (550, "5.7.1 Policy says reject.")),
    ],
)
async def test_defer_and_reject_answer_at_mail_from(
    gateway: tuple[RunningGateway, FakeUpstream],
    issuer: TestIssuer,
    mechanism: str,
    user: str,
    reply: tuple[int, str],
) -> None:
    gw, upstream = gateway
    result = await FakeDevice(issuer, user=user).send(gw.port, mechanism=mechanism)
    assert result.auth is not None
    assert result.auth[0] == 235
    assert result.mail == reply
    assert result.data is None
    assert upstream.messages == []


@pytest.mark.parametrize("mechanism", MECHANISMS)
async def test_hold_stores_durably_and_answers_250_2_6_0(
    gateway: tuple[RunningGateway, FakeUpstream], issuer: TestIssuer, mechanism: str
) -> None:
    gw, upstream = gateway
    result = await FakeDevice(issuer, user="hold@example.test").send(gw.port, mechanism=mechanism)
    assert result.data == (250, "2.6.0 held: Policy says hold.")
    assert upstream.messages == []
    (held,) = held_rows(gw.settings.hold.database)
    assert held.user == "hold@example.test"
    assert held.policy_ids == ("hold-policy",)


@pytest.mark.parametrize("mechanism", MECHANISMS)
async def test_bad_token_fails_auth_with_535(
    gateway: tuple[RunningGateway, FakeUpstream], issuer: TestIssuer, mechanism: str
) -> None:
    gw, _ = gateway
    stranger = TestIssuer.generate("k1")  # same kid, different key: bad signature
    result = await FakeDevice(issuer).send(
        gw.port, mechanism=mechanism, token=FakeDevice(stranger).token()
    )
    assert result.auth == (535, "5.7.8 Device token refused (bad_signature)")
    if mechanism == "PLAIN":
        assert result.auth_challenge is None
    else:
        assert result.auth_challenge is not None
        assert '"schemes": "bearer"' in result.auth_challenge


async def test_sasl_user_must_equal_token_subject(
    gateway: tuple[RunningGateway, FakeUpstream], issuer: TestIssuer
) -> None:
    gw, _ = gateway
    result = await FakeDevice(issuer, user="alice@example.test").send(
        gw.port, sasl_user="mallory@example.test"
    )
    assert result.auth == (535, "5.7.8 SASL user does not match the device token")


async def test_spoofed_sender_is_refused_and_alias_accepted(
    gateway: tuple[RunningGateway, FakeUpstream], issuer: TestIssuer
) -> None:
    gw, upstream = gateway
    device = FakeDevice(issuer, user="alice@example.test")
    spoofed = await device.send(gw.port, sender="ceo@example.test")
    assert spoofed.mail == (553, "5.7.1 Sender address not owned by the authenticated user")
    alias = await device.send(gw.port, sender="A.Smith@example.test")
    assert alias.data is not None
    assert alias.data[0] == 250
    assert [m.sender for m in upstream.messages] == ["A.Smith@example.test"]


async def test_no_auth_gives_530(gateway: tuple[RunningGateway, FakeUpstream]) -> None:
    gw, upstream = gateway
    async with aiosmtplib.SMTP(hostname=gw.host, port=gw.port, start_tls=False) as client:
        await client.ehlo()
        response = await client.execute_command(b"MAIL", b"FROM:<alice@example.test>")
    assert (response.code, response.message) == (530, "5.7.0 Authentication required")
    assert upstream.messages == []


async def test_relayed_bytes_are_submitted_bytes_plus_trace_header(
    gateway: tuple[RunningGateway, FakeUpstream], issuer: TestIssuer
) -> None:
    gw, upstream = gateway
    # Dot-stuffing, 8-bit body, trailing whitespace, long-but-legal line: all must survive.
    content = (
        b"From: <alice@example.test>\r\nTo: <bob@example.test>\r\nSubject: bytes\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n\r\n"
        b".leading dot\r\n..two dots\r\n\xc3\xa9t\xc3\xa9 \r\n" + b"x" * 998 + b"\r\n\r\n"
    )
    result = await FakeDevice(issuer).send(gw.port, message=content)
    assert result.data is not None
    assert result.data[0] == 250
    (message,) = upstream.messages
    received, _, rest = message.content.partition(b"\r\nFrom: ")
    assert received.startswith(
        b"Received: from device.test ([127.0.0.1])\r\n\tby gateway.test (Compliance Gateway) with ESMTPA id "
    )
    assert b"From: " + rest == content


async def test_null_sender_is_relayed(
    gateway: tuple[RunningGateway, FakeUpstream], issuer: TestIssuer
) -> None:
    gw, upstream = gateway
    result = await FakeDevice(issuer).send(gw.port, sender="")
    assert result.data is not None
    assert result.data[0] == 250
    assert upstream.messages[0].sender == ""


async def test_upstream_down_gives_451_and_nothing_delivered(
    tmp_path: Path, issuer: TestIssuer
) -> None:
    async with gateway_with_upstream(tmp_path, issuer) as (gw, upstream):
        await upstream.stop()
        result = await FakeDevice(issuer).send(gw.port)
    assert result.mail == (451, "4.4.1 Upstream mail server unavailable; please try again later")
    assert result.data is None
    assert upstream.messages == []


async def test_one_of_two_recipients_refused_upstream(
    gateway: tuple[RunningGateway, FakeUpstream], issuer: TestIssuer
) -> None:
    gw, upstream = gateway
    upstream.faults.rcpt_replies["nobody@example.test"] = "550 5.1.1 No such user"
    result = await FakeDevice(issuer).send(
        gw.port, recipients=["nobody@example.test", "bob@example.test"]
    )
    assert result.rcpt == {
        "nobody@example.test": (550, "5.1.1 upstream: No such user"),
        "bob@example.test": (250, "2.1.5 upstream: OK"),
    }
    assert result.data is not None
    assert result.data[0] == 250
    assert upstream.messages[0].recipients == ("bob@example.test",)


@pytest.mark.parametrize(
    ("fault", "expected"),
    [
        ({"data_reply": "554 5.6.0 Content rejected"}, (554, "5.6.0 upstream: Content rejected")),
        (
            {"data_reply": "452 4.3.1 Insufficient storage"},
            (452, "4.3.1 upstream: Insufficient storage"),
        ),
        (
            {"drop_after_data": True},
            (451, "4.4.2 Connection to upstream mail server lost; please try again later"),
        ),
    ],
)
async def test_upstream_failures_at_data(
    gateway: tuple[RunningGateway, FakeUpstream],
    issuer: TestIssuer,
    fault: dict[str, object],
    expected: tuple[int, str],
) -> None:
    gw, upstream = gateway
    for key, value in fault.items():
        setattr(upstream.faults, key, value)
    result = await FakeDevice(issuer).send(gw.port)
    assert result.data == expected
    assert upstream.messages == []


async def test_upstream_connections_are_reused(
    gateway: tuple[RunningGateway, FakeUpstream], issuer: TestIssuer
) -> None:
    gw, upstream = gateway
    device = FakeDevice(issuer)
    for _ in range(5):
        result = await device.send(gw.port)
        assert result.data is not None
        assert result.data[0] == 250
    assert len(upstream.messages) == 5
    assert upstream.connections == 1


async def test_failover_to_the_second_smarthost(tmp_path: Path, issuer: TestIssuer) -> None:
    async with FakeUpstream.running() as dead, FakeUpstream.running() as alive:
        await dead.stop()
        extra = (
            f'\n[[upstream.smarthosts]]\nhost = "127.0.0.1"\nport = {alive.port}\ntls = "none"\n'
        )
        config = write_config(tmp_path / "failover", issuer=issuer, upstream_port=dead.port)
        config.write_text(config.read_text().replace("[groups]", extra + "\n[groups]"))
        async with running_gateway(config) as gw:
            result = await FakeDevice(issuer).send(gw.port)
        assert result.data is not None
        assert result.data[0] == 250
        assert len(alive.messages) == 1


async def test_size_limits(tmp_path: Path, issuer: TestIssuer) -> None:
    async with gateway_with_upstream(tmp_path, issuer, smtp={"max_message_size": 2048}) as (
        gw,
        upstream,
    ):
        device = FakeDevice(issuer)
        at_mail = await device.send(gw.port, mail_options=["SIZE=4096"])
        assert at_mail.mail == (552, "5.3.4 message size exceeds fixed maximum message size")
        big = make_message(body="y" * 900 + "\r\n" + "z" * 900 + "\r\n" + "w" * 900)
        after_dot = await device.send(gw.port, message=big)
        assert after_dot.data == (552, "5.3.4 Message size exceeds fixed maximum message size")
        assert upstream.messages == []


async def test_too_many_recipients(tmp_path: Path, issuer: TestIssuer) -> None:
    async with gateway_with_upstream(tmp_path, issuer, smtp={"max_recipients": 2}) as (
        gw,
        upstream,
    ):
        result = await FakeDevice(issuer).send(
            gw.port, recipients=["a@x.test", "b@x.test", "c@x.test"]
        )
        assert result.rcpt["c@x.test"] == (452, "4.5.3 Too many recipients")
        assert upstream.messages[0].recipients == ("a@x.test", "b@x.test")


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


async def test_starttls_then_auth(tmp_path: Path, issuer: TestIssuer, ca: trustme.CA) -> None:
    cert = ca.issue_cert("gateway.test", "127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    smtp = {"allow_plaintext_auth": False, "tls_cert": "server.pem", "tls_key": "server.pem"}
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    async with gateway_with_upstream(tmp_path, issuer, smtp=smtp) as (gw, upstream):
        # Before TLS: STARTTLS offered, AUTH not offered, and refused if tried.
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=gw.port, start_tls=False) as client:
            await client.ehlo()
            assert "starttls" in client.esmtp_extensions
            assert "auth" not in client.esmtp_extensions
            response = await client.execute_command(b"AUTH", b"PLAIN", b"AGFsaWNlAHg=")
            assert (response.code, response.message) == (
                538,
                "5.7.11 Encryption required for requested authentication mechanism",
            )
        result = await FakeDevice(issuer).send(gw.port, starttls=True, tls_context=client_context)
        assert result.data is not None
        assert result.data[0] == 250
        assert b"with ESMTPSA" in upstream.messages[0].content


async def test_implicit_tls_listener(tmp_path: Path, issuer: TestIssuer, ca: trustme.CA) -> None:
    cert = ca.issue_cert("127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    smtp = {
        "allow_plaintext_auth": False,
        "tls_cert": "server.pem",
        "tls_key": "server.pem",
        "implicit_tls_listen": "127.0.0.1:0",
    }
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    async with gateway_with_upstream(tmp_path, issuer, smtp=smtp) as (gw, upstream):
        assert gw.implicit_tls_port is not None
        result = await FakeDevice(issuer).send(
            gw.implicit_tls_port, implicit_tls=True, tls_context=client_context
        )
        assert result.data is not None
        assert result.data[0] == 250
        assert len(upstream.messages) == 1


async def test_idle_timeout_does_not_cut_off_a_message_being_relayed(
    tmp_path: Path, issuer: TestIssuer
) -> None:
    async with gateway_with_upstream(tmp_path, issuer, smtp={"idle_timeout": 1}) as (gw, upstream):
        upstream.faults.delay = 2.5  # the upstream takes longer than the idle timeout
        result = await FakeDevice(issuer).send(gw.port)
        assert result.data == (250, "2.0.0 Message accepted for delivery")
        assert len(upstream.messages) == 1


async def test_idle_client_gets_421_4_4_2(tmp_path: Path, issuer: TestIssuer) -> None:
    async with gateway_with_upstream(tmp_path, issuer, smtp={"idle_timeout": 1}) as (gw, _):
        reader, writer = await asyncio.open_connection(gw.host, gw.port)
        assert (await reader.readline()).startswith(b"220 ")
        line = await asyncio.wait_for(reader.readline(), timeout=5)
        assert line == b"421 4.4.2 Timeout exceeded, closing connection\r\n"
        assert await reader.read() == b""
        writer.close()


async def test_each_command_moves_the_idle_deadline_and_the_timeout_follows_the_last(
    tmp_path: Path, issuer: TestIssuer
) -> None:
    """The idle timer is kept while commands arrive (it looks again when it fires): a
    client that talks every 0.4 s outlives the 1 s timeout, and is closed about 1 s after
    its last command, not 1 s after the timer was first set."""
    async with gateway_with_upstream(tmp_path, issuer, smtp={"idle_timeout": 1}) as (gw, _):
        reader, writer = await asyncio.open_connection(gw.host, gw.port)
        assert (await reader.readline()).startswith(b"220 ")
        loop = asyncio.get_running_loop()
        for _ in range(6):  # 2.4 s of commands
            await asyncio.sleep(0.4)
            writer.write(b"NOOP\r\n")
            assert (await reader.readline()).startswith(b"250")
        last = loop.time()
        line = await asyncio.wait_for(reader.readline(), timeout=5)
        idle = loop.time() - last
        assert line == b"421 4.4.2 Timeout exceeded, closing connection\r\n"
        assert 0.9 <= idle < 1.9, idle
        writer.close()


async def test_no_tls_session_tickets_are_issued(
    tmp_path: Path, issuer: TestIssuer, ca: trustme.CA
) -> None:
    """Phones do not resume and each process has its own ticket key: OpenSSL's two TLS 1.3
    tickets per handshake were CPU for nothing (docs/performance.md)."""
    cert = ca.issue_cert("gateway.test", "127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    smtp = {"allow_plaintext_auth": False, "tls_cert": "server.pem", "tls_key": "server.pem"}
    client_context = ssl.create_default_context()
    client_context.minimum_version = ssl.TLSVersion.TLSv1_3
    ca.configure_trust(client_context)
    async with (
        gateway_with_upstream(tmp_path, issuer, smtp=smtp) as (gw, _),
        await RawSmtp.connect(gw.port) as client,
    ):
        await client.reply()
        await client.command("EHLO device.test")
        assert (await client.command("STARTTLS"))[0] == 220
        await client.start_tls(client_context, server_hostname="gateway.test")
        assert (await client.command("EHLO device.test"))[0] == 250  # after any ticket
        tls = client.writer.get_extra_info("ssl_object")
        assert tls.version() == "TLSv1.3"
        assert tls.session is not None
        assert not tls.session.has_ticket
