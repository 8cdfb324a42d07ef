"""Every limit over real sockets, with the exact reply a client gets."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import pytest

from gateway.smtp.sasl import plain_response
from gateway.testing.device import FakeDevice
from gateway.testing.harness import gateway_with_upstream
from gateway.testing.issuer import TestIssuer
from gateway.testing.raw import RawSmtp
from tests.security.test_smtp_input import authenticated, start_data


@pytest.fixture(scope="module")
def issuer() -> TestIssuer:
    return TestIssuer.generate("k1")


async def test_connections_per_address_are_limited(tmp_path: Path, issuer: TestIssuer) -> None:
    async with gateway_with_upstream(tmp_path, issuer, limits={"max_connections_per_ip": 2}) as (
        gw,
        _,
    ):
        first, second = await RawSmtp.connect(gw.port), await RawSmtp.connect(gw.port)
        assert (await first.reply())[0] == 220
        assert (await second.reply())[0] == 220
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
        await second.__aexit__(None, None, None)


async def test_connections_in_total_are_limited(tmp_path: Path, issuer: TestIssuer) -> None:
    async with gateway_with_upstream(tmp_path, issuer, limits={"max_connections": 1}) as (gw, _):
        async with await RawSmtp.connect(gw.port) as first:
            assert (await first.reply())[0] == 220
            async with await RawSmtp.connect(gw.port) as second:
                assert await second.reply() == (
                    421,
                    "4.3.2 Too many connections; please try again later",
                )
                assert await second.closed()
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


async def test_auth_failures_per_address_then_421_and_close(
    tmp_path: Path, issuer: TestIssuer
) -> None:
    stranger = TestIssuer.generate("k1")  # signs with a key the gateway does not trust
    async with gateway_with_upstream(tmp_path, issuer, limits={"auth_failures_per_ip": 2}) as (
        gw,
        _,
    ):
        for _ in range(2):
            failed = await FakeDevice(stranger).send(gw.port)
            assert failed.auth is not None
            assert failed.auth[0] == 535
        # Even a good token is refused now: the address is over its budget.
        async with await RawSmtp.connect(gw.port) as client:
            await client.reply()
            assert (await client.command("EHLO device.test"))[0] == 250
            blob = base64.b64encode(
                plain_response("alice@example.test", FakeDevice(issuer).token())
            )
            assert await client.command(b"AUTH PLAIN " + blob) == (
                421,
                "4.7.0 Too many authentication failures from your address; try again later",
            )
            assert await client.closed()


async def test_bad_base64_counts_as_an_auth_failure(tmp_path: Path, issuer: TestIssuer) -> None:
    async with (
        gateway_with_upstream(tmp_path, issuer, limits={"auth_failures_per_ip": 1}) as (
            gw,
            _,
        ),
        await RawSmtp.connect(gw.port) as client,
    ):
        await client.reply()
        await client.command("EHLO device.test")
        assert await client.command("AUTH PLAIN !!!") == (501, "5.5.2 Cannot decode base64")
        assert (await client.command("AUTH PLAIN AGFAYg=="))[0] == 421


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
