"""Every limit over real sockets, with the exact reply a client gets."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.smtp.sasl import plain_response
from gateway.testing.device import FakeDevice
from gateway.testing.harness import gateway_with_upstream
from gateway.testing.issuer import TestIssuer
from gateway.testing.raw import RawSmtp
from tests.security.test_smtp_input import authenticated, start_data

# Failed AUTHs wait 0.5 s, doubling, by default; tests keep the delays short.
FAST_AUTH_FAILURES = {"auth_failure_delay_seconds": 0.01, "auth_failure_delay_max_seconds": 0.02}


@pytest.fixture(scope="module")
def issuer() -> TestIssuer:
    return TestIssuer.generate("k1")


async def test_connections_per_address_are_limited(tmp_path: Path, issuer: TestIssuer) -> None:
    """Authenticated sessions are never shed: with the address's share taken by them, a
    newcomer is refused."""
    async with gateway_with_upstream(tmp_path, issuer, limits={"max_connections_per_ip": 2}) as (
        gw,
        _,
    ):
        first, second = await authenticated(gw, issuer), await authenticated(gw, issuer)
        async with await RawSmtp.connect(gw.port) as third:
            assert await third.reply() == (
                421,
                "4.7.0 Too many connections from your address; please try again later",
            )
            assert await third.closed()
        await first.__aexit__(None, None, None)
        await asyncio.sleep(0.1)
        async with await RawSmtp.connect(gw.port) as fourth:  # a slot is free again
            assert (await fourth.reply())[0] == 220
        assert (await second.command("NOOP"))[0] == 250
        await second.__aexit__(None, None, None)


async def test_connections_in_total_are_limited(tmp_path: Path, issuer: TestIssuer) -> None:
    async with gateway_with_upstream(tmp_path, issuer, limits={"max_connections": 1}) as (gw, _):
        async with await authenticated(gw, issuer) as first:
            async with await RawSmtp.connect(gw.port) as second:
                assert await second.reply() == (
                    421,
                    "4.3.2 Too many connections; please try again later",
                )
                assert await second.closed()
            assert (await first.command("NOOP"))[0] == 250
        metrics = gw.server.services.metrics.render().decode()
        assert 'gateway_limit_refusals_total{limit="connections"} 1.0' in metrics


async def test_messages_per_user_per_minute(tmp_path: Path, issuer: TestIssuer) -> None:
    async with gateway_with_upstream(
        tmp_path, issuer, limits={"messages_per_user_per_minute": 2}
    ) as (gw, upstream):
        alice = FakeDevice(issuer, user="alice@example.test")
        for _ in range(2):
            assert (await alice.send(gw.port)).data == (250, "2.0.0 Message accepted for delivery")
        third = await alice.send(gw.port)
        assert third.mail == (450, "4.7.1 Too many messages; please try again in a minute")
        assert third.data is None
        other = await FakeDevice(issuer, user="bob@example.test").send(gw.port)
        assert other.data is not None
        assert other.data[0] == 250
        assert len(upstream.messages) == 3


async def test_a_stale_phone_behind_nat_does_not_lock_out_its_neighbours(
    tmp_path: Path, issuer: TestIssuer
) -> None:
    """Phones behind carrier NAT share an address: a stale phone failing AUTH over and
    over (more often than the old per-address budget of 20) must not cost a valid token
    from the same address its session. A signed token cannot be guessed anyway."""
    stranger = TestIssuer.generate("k1")  # signs with a key the gateway does not trust
    async with gateway_with_upstream(tmp_path, issuer, limits=FAST_AUTH_FAILURES) as (
        gw,
        upstream,
    ):
        for _ in range(25):
            failed = await FakeDevice(stranger, device_id="stale-phone").send(gw.port)
            assert failed.auth is not None
            assert failed.auth[0] == 535
        sent = await FakeDevice(issuer).send(gw.port)  # from 127.0.0.1 too
        assert sent.auth == (235, "2.7.0 Authentication successful")
        assert sent.accepted
        assert len(upstream.messages) == 1


async def test_failed_auths_slow_the_session_down_then_421_and_close(
    tmp_path: Path, issuer: TestIssuer
) -> None:
    stranger = TestIssuer.generate("k1")
    limits = {
        "auth_failures_per_session": 3,
        "auth_failure_delay_seconds": 0.2,
        "auth_failure_delay_max_seconds": 0.3,
    }
    async with (
        gateway_with_upstream(tmp_path, issuer, limits=limits) as (gw, _),
        await RawSmtp.connect(gw.port) as client,
    ):
        await client.reply()
        await client.command("EHLO device.test")
        bad = b"AUTH PLAIN " + base64.b64encode(
            plain_response("alice@example.test", FakeDevice(stranger).token())
        )
        loop = asyncio.get_running_loop()
        waited = []
        for _ in range(2):
            started = loop.time()
            assert (await client.command(bad))[0] == 535
            waited.append(loop.time() - started)
        assert waited[0] >= 0.2
        assert waited[1] >= 0.3  # 0.4, capped at 0.3
        started = loop.time()
        assert (await client.command(bad))[0] == 535
        assert loop.time() - started >= 0.3
        assert await client.reply() == (
            421,
            "4.7.0 Too many authentication failures; closing connection",
        )
        assert await client.closed()
        # Another session from the same address starts afresh and is not slowed down.
        async with await authenticated(gw, issuer) as other:
            assert (await other.command("NOOP"))[0] == 250
        metrics = gw.server.services.metrics.render().decode()
        assert 'gateway_limit_refusals_total{limit="auth_failures_per_session"} 1.0' in metrics


async def test_bad_base64_counts_as_an_auth_failure(tmp_path: Path, issuer: TestIssuer) -> None:
    async with (
        gateway_with_upstream(
            tmp_path, issuer, limits={"auth_failures_per_session": 2, **FAST_AUTH_FAILURES}
        ) as (gw, _),
        await RawSmtp.connect(gw.port) as client,
    ):
        await client.reply()
        await client.command("EHLO device.test")
        assert await client.command("AUTH PLAIN !!!") == (501, "5.5.2 Cannot decode base64")
        assert (await client.command("AUTH PLAIN AGFAYg=="))[0] == 501  # SASL syntax
        assert (await client.reply())[0] == 421
        assert await client.closed()


async def test_command_call_limit(tmp_path: Path, issuer: TestIssuer) -> None:
    async with (
        gateway_with_upstream(tmp_path, issuer, limits={"command_call_limit": 3}) as (
            gw,
            _,
        ),
        await RawSmtp.connect(gw.port) as client,
    ):
        await client.reply()
        for _ in range(3):
            assert (await client.command("NOOP"))[0] == 250
        assert await client.command("NOOP") == (421, "4.7.0 NOOP sent too many times")
        assert await client.closed()


async def test_repeated_errors_end_the_session(tmp_path: Path, issuer: TestIssuer) -> None:
    async with (
        gateway_with_upstream(tmp_path, issuer, limits={"max_errors": 3}) as (gw, _),
        await RawSmtp.connect(gw.port) as client,
    ):
        await client.reply()
        assert (await client.command("BOGUS"))[0] == 500
        assert (await client.command("MAIL FROM:<x@example.test>"))[0] == 503
        await client.send(b"RCPT\r\n")
        assert (await client.reply())[0] == 503
        assert await client.reply() == (421, "4.7.0 Too many errors; closing connection")
        assert await client.closed()


async def test_data_timeout_gives_421_4_4_2(tmp_path: Path, issuer: TestIssuer) -> None:
    async with gateway_with_upstream(tmp_path, issuer, smtp={"data_timeout": 1}) as (gw, upstream):
        async with await authenticated(gw, issuer) as client:
            await start_data(client)
            await client.send(b"Subject: stalls\r\n")  # then nothing
            assert await client.reply(timeout=5) == (
                421,
                "4.4.2 Timeout exceeded, closing connection",
            )
        await asyncio.sleep(0.1)
        assert upstream.messages == []


async def test_idle_unauthenticated_connections_do_not_lock_out_a_valid_device(
    tmp_path: Path, issuer: TestIssuer
) -> None:
    """max_connections full of idle sockets that never authenticate: a device with a valid
    token still gets in, and the oldest idle unauthenticated session makes room."""
    async with gateway_with_upstream(tmp_path, issuer, limits={"max_connections": 4}) as (
        gw,
        upstream,
    ):
        idle = []
        for _ in range(4):
            client = await RawSmtp.connect(gw.port)
            assert (await client.reply())[0] == 220
            idle.append(client)
            await asyncio.sleep(0.02)  # a distinct age for each
        assert (await idle[1].command("EHLO idle.test"))[0] == 250  # active, not the oldest
        sent = await FakeDevice(issuer).send(gw.port)
        assert sent.auth == (235, "2.7.0 Authentication successful")
        assert sent.accepted
        assert len(upstream.messages) == 1
        assert await idle[0].reply() == (
            421,
            "4.3.2 Too many connections; closing an idle unauthenticated connection",
        )
        assert await idle[0].closed()
        await idle[0].__aexit__(None, None, None)
        for client in idle[1:]:
            assert (await client.command("NOOP"))[0] == 250  # the others were left alone
            await client.__aexit__(None, None, None)
        metrics = gw.server.services.metrics.render().decode()
        assert 'gateway_limit_refusals_total{limit="unauthenticated_shed"} 1.0' in metrics


async def test_the_pre_auth_timeout_is_shorter_under_load(
    tmp_path: Path, issuer: TestIssuer
) -> None:
    limits = {"max_unauthenticated_connections": 2, "pre_auth_timeout_under_load_seconds": 1}
    async with (
        gateway_with_upstream(tmp_path, issuer, limits=limits) as (gw, _),
        await authenticated(gw, issuer) as device,
        await RawSmtp.connect(gw.port) as idle,
    ):
        assert (await idle.reply())[0] == 220  # one of two unauthenticated slots: under load
        assert (await idle.command("EHLO idle.test"))[0] == 250
        assert await idle.reply(timeout=5) == (421, "4.4.2 Timeout exceeded, closing connection")
        assert await idle.closed()
        # The authenticated session keeps [smtp] idle_timeout (30 s in the test kit).
        assert (await device.command("NOOP"))[0] == 250


def _body(kib: int, tag: str) -> bytes:
    """A message of about ``kib`` KiB whose lines sometimes start with a dot (they are
    stuffed on the wire, RFC 5321 s 4.5.2, and must arrive upstream unstuffed)."""
    head = f"From: <alice@example.test>\r\nTo: <bob@example.test>\r\nSubject: {tag}\r\n\r\n"
    lines = [
        (("." if n % 7 == 0 else "") + f"{tag} line {n:06d} ").ljust(78, "x")
        for n in range(kib * 1024 // 80)
    ]
    return head.encode() + "".join(line + "\r\n" for line in lines).encode()


def _stuffed(body: bytes) -> bytes:
    return body.replace(b"\r\n.", b"\r\n..")


async def _wait_for(condition: Callable[[], bool], within: float = 5.0) -> None:
    async with asyncio.timeout(within):
        while not condition():  # noqa: ASYNC110  # polls gateway state, no event to wait on
            await asyncio.sleep(0.01)


async def test_data_bytes_in_flight_have_a_budget(tmp_path: Path, issuer: TestIssuer) -> None:
    """Two big messages at once under a 1 MiB budget: the second gets 452 4.3.1, the first
    is delivered intact, and once it is through the budget admits the next one."""
    async with gateway_with_upstream(
        tmp_path, issuer, limits={"data_bytes_in_flight": 1024 * 1024}
    ) as (gw, upstream):
        budget = gw.server.services.submission.data_budget
        first_body, second_body = _body(700, "first"), _body(700, "second")
        async with await authenticated(gw, issuer) as first:
            await start_data(first)
            half = _stuffed(first_body)[: 600 * 1024]
            half = half[: half.rindex(b"\r\n") + 2]
            await first.send(half)
            await _wait_for(lambda: budget.used >= 500 * 1024)
            async with await authenticated(gw, issuer) as second:
                await start_data(second)
                await second.send(_stuffed(second_body) + b".\r\n")
                assert await second.reply(timeout=10) == (
                    452,
                    "4.3.1 Insufficient system storage; please try again later",
                )
                # SIZE= says it up front (RFC 1870 s 6.1): refused at MAIL, nothing sent.
                assert await second.command("MAIL FROM:<alice@example.test> SIZE=700000") == (
                    452,
                    "4.3.1 Insufficient system storage; please try again later",
                )
                await first.send(_stuffed(first_body)[len(half) :] + b".\r\n")
                assert (await first.reply(timeout=10))[0] == 250
                await _wait_for(lambda: budget.used == 0)
                await start_data(second)
                await second.send(_stuffed(second_body) + b".\r\n")
                assert (await second.reply(timeout=10))[0] == 250
        assert len(upstream.messages) == 2
        for received, body in zip(upstream.messages, (first_body, second_body), strict=True):
            assert received.content.startswith(b"Received: from device.test")
            assert received.content.endswith(body)  # intact: unstuffed, byte for byte
            assert len(received.content) - len(body) < 300  # only the trace header added
        metrics = gw.server.services.metrics.render().decode()
        assert 'gateway_limit_refusals_total{limit="data_bytes_in_flight"} 2.0' in metrics
