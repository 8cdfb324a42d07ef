"""A policy narrowed by scope.access decides only that access, end to end: the same
device and token over the sync endpoint (HTTP) and over SMTP submission."""

from __future__ import annotations

from pathlib import Path

import aiohttp

from gateway.testing.device import FakeDevice
from gateway.testing.harness import gateway_with_upstream
from gateway.testing.issuer import TestIssuer
from tests.sync.test_dovecot import USER, introspect, write_secrets

SYNC_ONLY_BAN = (
    '[[policy]]\nid = "no-sync-with-tiktok"\nmatch.apps_any = ["com.tiktok"]\n'
    'scope.access = ["sync"]\naction = "reject"\nmessage = "Remove TikTok to read mail."\n'
)
SEND_ONLY_BAN = (
    '[[policy]]\nid = "no-send-with-trill"\nmatch.apps_any = ["com.trill"]\n'
    'scope.access = ["send"]\naction = "reject"\nmessage = "Remove Trill to send mail."\n'
)


async def test_a_sync_only_ban_refuses_logins_but_not_sending_and_vice_versa(
    tmp_path: Path,
) -> None:
    issuer = TestIssuer.generate("k1")
    policies = {"sync.toml": SYNC_ONLY_BAN, "send.toml": SEND_ONLY_BAN}
    async with (
        gateway_with_upstream(tmp_path, issuer, policies, sync=write_secrets(tmp_path)) as (
            gateway,
            upstream,
        ),
        aiohttp.ClientSession(
            base_url=f"http://127.0.0.1:{gateway.sync_port}",
            timeout=aiohttp.ClientTimeout(total=10),
        ) as client,
    ):
        tiktok = FakeDevice(issuer, user=USER, device_id="phone-1", apps={"com.tiktok"})
        status, body = await introspect(client, tiktok.token())
        assert status == 200
        assert body["decision"] == "reject"
        assert body["reason"] == "Remove TikTok to read mail."
        assert (await tiktok.send(gateway.port)).accepted  # sending is not gated

        trill = FakeDevice(issuer, user=USER, device_id="phone-2", apps={"com.trill"})
        status, body = await introspect(client, trill.token())
        assert (status, body["active"], body["decision"]) == (200, True, "allow")
        result = await trill.send(gateway.port)
        assert result.mail == (550, "5.7.1 Remove Trill to send mail.")
        assert len(upstream.messages) == 1
