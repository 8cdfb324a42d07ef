"""Hostile policy files reach a running gateway: each is a clear error, and the last good
set stays in force (a device with the banned app is still held, over real SMTP)."""

from __future__ import annotations

from pathlib import Path

from gateway.testing.device import FakeDevice
from gateway.testing.harness import gateway_with_upstream
from gateway.testing.issuer import TestIssuer
from tests.policy.test_loader import HOSTILE_FILES
from tests.stories import TIKTOK, tiktok_ban

HUGE = (b"# padding\n" * 500_000, "larger than")


async def test_each_hostile_file_keeps_the_last_good_set(tmp_path: Path) -> None:
    issuer = TestIssuer.generate("k1")
    async with gateway_with_upstream(tmp_path, issuer, {"ban.toml": tiktok_ban("hold")}) as (
        gw,
        upstream,
    ):
        good_version = gw.server.services.policies.current.version
        phone = FakeDevice(issuer, apps={TIKTOK})
        for content, expected in [*HOSTILE_FILES, HUGE]:
            evil = gw.policy_dir / "evil.toml"
            evil.write_bytes(content)
            result = await gw.server.reload("test")
            assert not result.ok, expected
            assert any(expected in str(p) and "evil.toml" in str(p) for p in result.problems), (
                expected,
                result.problems,
            )
            assert gw.server.services.policies.current.version == good_version
            assert (await phone.send(gw.port)).data == (250, "2.6.0 held: Remove TikTok.")
            evil.unlink()
        assert upstream.messages == []
