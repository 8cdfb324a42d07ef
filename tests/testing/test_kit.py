"""The test kit as users see it: the pytest plugin's fixtures, and limits users rely on."""

from __future__ import annotations

import base64

import aiosmtplib

from gateway.testing.device import FakeDevice
from gateway.testing.issuer import TestIssuer
from gateway.testing.pytest_plugin import GatewayFactory
from gateway.testing.upstream import FakeUpstream

BAN = '[[policy]]\nid = "x"\nmatch.apps_any = ["com.bad"]\naction = "reject"\nmessage = "No."\n'


async def test_plugin_fixtures(
    gateway_factory: GatewayFactory, test_issuer: TestIssuer, fake_upstream: FakeUpstream
) -> None:
    async with gateway_factory({"ban.toml": BAN}) as gateway:
        phone = FakeDevice(test_issuer, apps={"com.bad"})
        assert (await phone.send(gateway.port, mechanism="OAUTHBEARER")).mail == (550, "5.7.1 No.")
        phone.remove("com.bad")
        assert (await phone.send(gateway.port)).data == (250, "2.0.0 Message accepted for delivery")
    assert len(fake_upstream.messages) == 1


async def test_auth_line_over_the_cap_is_500_5_5_6(
    gateway_factory: GatewayFactory, test_issuer: TestIssuer
) -> None:
    async with (
        gateway_factory(smtp={"max_auth_bytes": 4096}) as gateway,
        aiosmtplib.SMTP(hostname=gateway.host, port=gateway.port) as client,
    ):
        await client.ehlo()
        token = FakeDevice(test_issuer).token()
        ok_blob = base64.b64encode(b"\0alice@example.test\0" + token.encode())
        assert len(ok_blob) < 4096  # a real token fits well inside the cap
        too_long = base64.b64encode(b"\0alice@example.test\0" + b"x" * 5000)
        response = await client.execute_command(b"AUTH", b"PLAIN", too_long)
        assert (response.code, response.message) == (
            500,
            "5.5.6 Authentication exchange line is too long",
        )
        # Over the reader's own limit too: still a clean error, and the session survives.
        huge = b"A" * 20000
        response = await client.execute_command(b"AUTH", b"PLAIN", huge)
        assert response.code == 500
        response = await client.execute_command(b"AUTH", b"PLAIN", ok_blob)
        assert (response.code, response.message) == (235, "2.7.0 Authentication successful")


async def test_auth_cancel_and_bad_base64(gateway_factory: GatewayFactory) -> None:
    async with (
        gateway_factory() as gateway,
        aiosmtplib.SMTP(hostname=gateway.host, port=gateway.port) as client,
    ):
        await client.ehlo()
        response = await client.execute_command(b"AUTH", b"PLAIN", b"!!!notbase64")
        assert (response.code, response.message) == (501, "5.5.2 Cannot decode base64")
        response = await client.execute_command(b"AUTH", b"PLAIN")
        assert response.code == 334
        response = await client.execute_command(b"*")
        assert (response.code, response.message) == (501, "5.7.0 Authentication aborted")
        response = await client.execute_command(b"AUTH", b"CRAM-MD5")
        assert (response.code, response.message) == (
            504,
            "5.5.4 Unrecognized authentication type",
        )
