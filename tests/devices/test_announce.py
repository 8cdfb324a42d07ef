"""Announcements and withdrawals to exactly the affected users, end to end: the inventory
filled by real SMTP sessions, notices relayed to a fake upstream, restarts in between."""

from __future__ import annotations

import asyncio
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from gateway import services as services_module
from gateway.testing.device import FakeDevice
from gateway.testing.harness import running_gateway, write_config
from gateway.testing.issuer import TestIssuer
from gateway.testing.upstream import FakeUpstream
from tests.devices.test_notices import subjects
from tests.stories import TIKTOK

ANNOUNCE = datetime(2020, 7, 10, 16, 0, tzinfo=UTC)
ENFORCE = ANNOUNCE + timedelta(hours=15)
BAN = f"""
[[policy]]
id = "remove-tiktok"
match.apps_any = ["{TIKTOK}"]
scope.device_class = ["mobile", "tablet"]
announce_at = {ANNOUNCE.isoformat()}
enforce_at = {ENFORCE.isoformat()}
action = "hold"
message = "Remove TikTok."
state = "enforce"
"""
RETRACTED = BAN.replace(
    'state = "enforce"', 'state = "retracted"\nretracted_reason = "sent in error"'
)
WARN = "Subject: Action required for mobile mail on {}"
DISREGARD = "Subject: Disregard the earlier notice about {}"


def notices(upstream: FakeUpstream) -> dict[str, list[str]]:
    users = ("alice", "bob", "carol", "dave")
    found = {u: subjects(upstream, f"{u}@example.test") for u in users}
    return {u: s for u, s in found.items() if s}


async def settle(upstream: FakeUpstream, count: int) -> None:
    """Wait for ``count`` notices in all, then a little longer for any extra one."""
    async with asyncio.timeout(10):
        while sum(map(len, notices(upstream).values())) < count:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    await asyncio.sleep(0.6)  # several ticks: a second copy would show by now


@pytest.mark.slow
async def test_announcement_and_withdrawal_reach_exactly_the_affected_users(
    tmp_path: Path,
) -> None:
    issuer = TestIssuer.generate("k1")
    wall = [ANNOUNCE - timedelta(hours=2)]
    alice = FakeDevice(issuer, user="alice@example.test", device_id="alice-phone", apps={TIKTOK})
    bob = FakeDevice(issuer, user="bob@example.test", device_id="bob-phone", apps={TIKTOK})
    carol = FakeDevice(  # the laptop-only user: the app, but the ban is for phones
        issuer, user="carol@example.test", device_id="carol-laptop", device_class="desktop",
        platform="macos", apps={TIKTOK},
    )  # fmt: skip
    dave = FakeDevice(issuer, user="dave@example.test", device_id="dave-phone")  # no app
    async with FakeUpstream.running() as upstream:
        config = write_config(
            tmp_path, issuer=issuer, upstream_port=upstream.port, policies={"ban.toml": BAN},
            notices=True,
        )  # fmt: skip
        async with running_gateway(config, clock=lambda: wall[0]) as gateway:
            for device in (alice, bob, carol, dave):  # before the announcement: allowed
                result = await device.send(gateway.port, at=wall[0])
                assert result.accepted
            await asyncio.sleep(0.5)
            assert notices(upstream) == {}
            wall[0] = ANNOUNCE + timedelta(minutes=1)  # the announce phase begins
            await settle(upstream, 2)
        assert notices(upstream) == {
            "alice": [WARN.format("alice-phone")],
            "bob": [WARN.format("bob-phone")],
        }
        # A restart (the inventory and the notices table read back) sends no second copy.
        async with running_gateway(config, clock=lambda: wall[0]) as gateway:
            await asyncio.sleep(0.8)
            assert sum(map(len, notices(upstream).values())) == 2
            (gateway.policy_dir / "ban.toml").write_text(RETRACTED)
            assert (await gateway.server.reload("test")).ok
            await settle(upstream, 4)
        async with running_gateway(config, clock=lambda: wall[0]) as gateway:
            await asyncio.sleep(0.8)
    assert notices(upstream) == {
        "alice": [WARN.format("alice-phone"), DISREGARD.format("alice-phone")],
        "bob": [WARN.format("bob-phone"), DISREGARD.format("bob-phone")],
    }
    withdrawn = [m for m in upstream.messages if b"Disregard" in m.content]
    assert all(b"sent in error" in m.content for m in withdrawn)


@pytest.mark.slow
async def test_a_suspended_policy_announces_to_nobody_and_an_exempted_user_is_not_told(
    tmp_path: Path,
) -> None:
    """Operator overrides hold for the announcement too: while the ban is suspended its
    announce phase tells nobody; once resumed it tells the phones, except the user with
    a break-glass exemption."""
    issuer = TestIssuer.generate("k1")
    wall = [ANNOUNCE - timedelta(hours=2)]
    alice = FakeDevice(issuer, user="alice@example.test", device_id="alice-phone", apps={TIKTOK})
    bob = FakeDevice(issuer, user="bob@example.test", device_id="bob-phone", apps={TIKTOK})
    async with FakeUpstream.running() as upstream:
        config = write_config(
            tmp_path, issuer=issuer, upstream_port=upstream.port, policies={"ban.toml": BAN},
            notices=True,
        )  # fmt: skip
        async with running_gateway(config, clock=lambda: wall[0]) as gateway:
            for device in (alice, bob):
                assert (await device.send(gateway.port, at=wall[0])).accepted
            services = gateway.server.services
            store, now = services.hold_store, wall[0]
            until = ENFORCE + timedelta(days=1)
            await store.suspend_policy("remove-tiktok", until, "INC-1", "test", now)
            await store.exempt_from_policy(
                "remove-tiktok", "user:bob@example.test", until, "travelling", "test", now
            )
            assert await services.refresh_overrides()
            wall[0] = ANNOUNCE + timedelta(minutes=1)  # the announce phase begins, suspended
            await asyncio.sleep(1.5)  # several release ticks, each a sweep
            assert notices(upstream) == {}
            assert await store.resume_policy("remove-tiktok") == 1
            assert await services.refresh_overrides()
            await settle(upstream, 1)
    assert notices(upstream) == {"alice": [WARN.format("alice-phone")]}


@pytest.mark.slow
async def test_a_policy_deleted_while_the_previous_reload_is_recorded_is_still_withdrawn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two reloads overlap (SIGHUP during a watch reload, say): the second deletes the ban
    while the first's policy-history record is still being written. Each reload's
    follow-up must compare the sets on either side of it, so the deletion is seen and
    the phone told about the ban is asked to disregard it."""
    issuer = TestIssuer.generate("k1")
    wall = [ANNOUNCE + timedelta(minutes=1)]
    alice = FakeDevice(issuer, user="alice@example.test", device_id="alice-phone", apps={TIKTOK})
    other = BAN.replace('"remove-tiktok"', '"remove-other"').replace(TIKTOK, "com.example.other")
    async with FakeUpstream.running() as upstream:
        config = write_config(
            tmp_path, issuer=issuer, upstream_port=upstream.port,
            policies={"ban.toml": BAN, "other.toml": other}, notices=True,
        )  # fmt: skip
        async with running_gateway(config, clock=lambda: wall[0]) as gateway:
            assert (await alice.send(gateway.port, at=wall[0])).accepted
            await settle(upstream, 1)
            # The history's snapshot of each reload waits for its turn (a large set takes
            # that long): the first is still being recorded when the second reload applies,
            # and the first's record ends while the second's is still going.
            real, entered = services_module.snapshot, [threading.Event(), threading.Event()]
            go = [threading.Event(), threading.Event()]

            def slow_snapshot(*args: Any) -> Any:
                turn = sum(e.is_set() for e in entered)
                entered[turn].set()
                assert go[turn].wait(10)
                return real(*args)

            monkeypatch.setattr(services_module, "snapshot", slow_snapshot)
            policy_dir = gateway.policy_dir
            (policy_dir / "other.toml").write_text(other.replace("Remove TikTok.", "Remove it."))
            first = asyncio.create_task(gateway.server.reload("first"))
            assert await asyncio.to_thread(entered[0].wait, 10)
            (policy_dir / "ban.toml").unlink()
            second = asyncio.create_task(gateway.server.reload("second"))
            assert await asyncio.to_thread(entered[1].wait, 10)
            go[0].set()
            assert (await asyncio.wait_for(first, 10)).ok
            go[1].set()
            assert (await asyncio.wait_for(second, 10)).ok
            await settle(upstream, 2)
    assert notices(upstream) == {
        "alice": [WARN.format("alice-phone"), DISREGARD.format("alice-phone")]
    }


@pytest.mark.slow
async def test_a_suspension_stops_an_announcement_already_being_sent(tmp_path: Path) -> None:
    """The announcement is paced: to a large inventory it is minutes of mail. A suspension
    made while it goes out stops it at the next notice, not once every device was told."""
    issuer = TestIssuer.generate("k1")
    wall = [ANNOUNCE - timedelta(hours=2)]
    phones = [
        FakeDevice(issuer, user=f"{name}@example.test", device_id=f"{name}-phone", apps={TIKTOK})
        for name in ("alice", "bob", "carol", "dave")
    ]
    async with FakeUpstream.running() as upstream:
        config = write_config(
            tmp_path, issuer=issuer, upstream_port=upstream.port, policies={"ban.toml": BAN},
            notices=True, sections={"gateway": {"announce_notices_per_second": 0.5}},
        )  # fmt: skip
        async with running_gateway(config, clock=lambda: wall[0]) as gateway:
            for phone in phones:  # before the announcement: allowed, and in the inventory
                assert (await phone.send(gateway.port, at=wall[0])).accepted
            wall[0] = ANNOUNCE + timedelta(minutes=1)  # the announce phase begins
            async with asyncio.timeout(10):
                while not notices(upstream):  # noqa: ASYNC110  # the first notice
                    await asyncio.sleep(0.05)
            services = gateway.server.services
            until = ENFORCE + timedelta(days=1)
            await services.hold_store.suspend_policy(
                "remove-tiktok", until, "INC-2", "test", wall[0]
            )
            assert await services.refresh_overrides()
            await asyncio.sleep(5)  # one every 2 s: two more would be out by now
            told = sum(map(len, notices(upstream).values()))
    assert 1 <= told <= 2  # the one sent, and at most the one on its way
