"""Grace per device and staged rollout over real SMTP: a real gateway, a fake upstream,
devices submitting with signed tokens, the gateway's wall clock moved by the test."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway.hold.store import HoldStore
from gateway.testing.device import FakeDevice
from gateway.testing.harness import running_gateway, write_config
from gateway.testing.issuer import TestIssuer
from gateway.testing.upstream import FakeUpstream
from tests.stories import TIKTOK, tiktok_ban

DEADLINE = datetime(2020, 7, 11, 7, 0, tzinfo=UTC)
GRACE_BAN = tiktok_ban(
    "hold",
    extra=(
        f"announce_at = {(DEADLINE - timedelta(days=7)).isoformat()}\n"
        f"enforce_at = {DEADLINE.isoformat()}\n"
        "grace_hours = 72\n"
    ),
)


@pytest.fixture(scope="module")
def issuer() -> TestIssuer:
    return TestIssuer.generate("k1")


def phone(issuer: TestIssuer, device_id: str) -> FakeDevice:
    device = FakeDevice(issuer, user=f"{device_id}@example.test", device_id=device_id)
    device.install(TIKTOK)
    return device


@pytest.mark.slow
async def test_grace_gives_a_late_phone_its_own_warning_period(
    tmp_path: Path, issuer: TestIssuer
) -> None:
    """A phone first seen after the deadline is warned (its mail relayed) for grace_hours
    from then, then held; a phone seen well before the deadline is held at the deadline.
    The first-seen time survives a restart (it is in the hold store)."""
    wall = [DEADLINE - timedelta(days=5)]
    early, late = phone(issuer, "early-phone"), phone(issuer, "late-phone")
    async with FakeUpstream.running() as upstream:
        config = write_config(
            tmp_path, issuer=issuer, upstream_port=upstream.port, policies={"ban.toml": GRACE_BAN}
        )

        async def send(device: FakeDevice) -> tuple[int, str]:
            result = await device.send(gateway.port, at=wall[0])
            assert result.data is not None, result
            return result.data

        async with running_gateway(config, clock=lambda: wall[0]) as gateway:
            code, _ = await send(early)  # announce phase: warned, relayed
            assert code == 250
            assert len(await upstream.wait_for(1)) == 1
            wall[0] = DEADLINE + timedelta(minutes=1)
            code, text = await send(early)
            assert (code, text.split(":")[0]) == (250, "2.6.0 held")
            wall[0] = DEADLINE + timedelta(days=1)  # the late phone appears
            first_seen = wall[0]
            code, text = await send(late)
            assert code == 250
            assert "held" not in text
            assert len(await upstream.wait_for(2)) == 2
        # A restart keeps the late phone's first-seen time: its deadline does not move.
        async with running_gateway(config, clock=lambda: wall[0]) as gateway:
            wall[0] = first_seen + timedelta(hours=71)
            code, text = await send(late)
            assert code == 250
            assert "held" not in text
            assert len(await upstream.wait_for(3)) == 3
            wall[0] = first_seen + timedelta(hours=72)
            code, text = await send(late)
            assert (code, text.split(":")[0]) == (250, "2.6.0 held")
        assert len(upstream.messages) == 3
    store = HoldStore(tmp_path / "hold.db")
    try:
        assert store.first_seen_times("late-phone") == {"remove-tiktok": first_seen}
        assert store.first_seen_times("early-phone") == {
            "remove-tiktok": DEADLINE - timedelta(days=5)
        }
        assert len(store.select()) == 2
    finally:
        store.close()


@pytest.mark.slow
async def test_ten_percent_rollout_over_smtp_holds_exactly_the_devices_in_the_stage(
    tmp_path: Path, issuer: TestIssuer
) -> None:
    """The devices a 10% rollout holds over SMTP are exactly those the stable bucket puts
    in the stage; the others are warned and their mail relayed."""
    from gateway.policy.model import rollout_bucket

    ban = tiktok_ban("hold", extra="rollout.percent = 10\n")
    devices = [phone(issuer, f"phone-{n:02d}") for n in range(40)]
    expected = {d.device_id for d in devices if rollout_bucket(d.device_id, "remove-tiktok") < 1000}
    async with FakeUpstream.running() as upstream:
        config = write_config(
            tmp_path, issuer=issuer, upstream_port=upstream.port, policies={"ban.toml": ban}
        )
        async with running_gateway(config) as gateway:
            held = set()
            for device in devices:
                result = await device.send(gateway.port)
                assert result.data is not None
                assert result.data[0] == 250
                if "held" in result.data[1]:
                    held.add(device.device_id)
    assert held == expected
    assert 0 < len(held) < 10
    assert len(upstream.messages) == 40 - len(held)
