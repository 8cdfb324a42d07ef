"""Notice mails: once per device, policy and phase (warn, hold, released)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

from gateway.testing.device import FakeDevice
from gateway.testing.harness import running_gateway, write_config
from gateway.testing.issuer import TestIssuer
from gateway.testing.upstream import FakeUpstream

TIKTOK = "com.zhiliaoapp.musically"
NOW = datetime.now(UTC)
BAN = f"""
[[policy]]
id = "remove-tiktok"
match.apps_any = ["{TIKTOK}"]
announce_at = {(NOW - timedelta(days=1)).isoformat()}
enforce_at = {(NOW + timedelta(hours=1)).isoformat()}
action = "hold"
message = "Remove TikTok."
state = "enforce"
"""


def subjects(upstream: FakeUpstream, to: str) -> list[str]:
    found = []
    for message in upstream.messages:
        if message.recipients == (to,) and b"Auto-Submitted: auto-generated" in message.content:
            found.append(
                next(line for line in message.headers.splitlines() if line.startswith("Subject:"))
            )
    return found


async def test_notices_once_per_device_policy_and_phase(tmp_path: Path) -> None:
    issuer = TestIssuer.generate("k1")
    clock = [NOW]
    async with FakeUpstream.running() as upstream:
        config = write_config(
            tmp_path,
            issuer=issuer,
            upstream_port=upstream.port,
            policies={"ban.toml": BAN},
            notices=True,
        )
        async with running_gateway(config, clock=lambda: clock[0]) as gateway:
            phone = FakeDevice(issuer, apps={TIKTOK})
            for _ in range(3):  # warned three times, noticed once
                result = await phone.send(gateway.port, at=clock[0])
                assert result.data is not None
                assert result.data[0] == 250
            clock[0] = NOW + timedelta(hours=2)  # past the deadline: held
            for _ in range(2):
                assert (await phone.send(gateway.port, at=clock[0])).data == (
                    250,
                    "2.6.0 held: Remove TikTok.",
                )
            policy = gateway.policy_dir / "ban.toml"
            policy.write_text(BAN.replace('state = "enforce"', 'state = "retracted"'))
            await gateway.server.reload("test")
            async with asyncio.timeout(5):
                while len(subjects(upstream, "alice@example.test")) < 4:  # noqa: ASYNC110  # background tasks
                    await asyncio.sleep(0.05)
            await asyncio.sleep(0.3)
    sent = subjects(upstream, "alice@example.test")
    assert sent[:2] == [
        "Subject: Action required for mobile mail on phone-1",
        "Subject: Mail from phone-1 is being held",
    ]
    # The retraction: the held mail goes out, and the "disregard" notice (in either order).
    assert sorted(sent[2:]) == [
        "Subject: Disregard the earlier notice about phone-1",
        "Subject: Held mail from phone-1 has been sent",
    ]
