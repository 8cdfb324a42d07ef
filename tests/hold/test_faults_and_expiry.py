"""Hold store faults over real sockets, and expiry bounces."""

from __future__ import annotations

import asyncio
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway.hold.store import held_rows
from gateway.testing.device import FakeDevice
from gateway.testing.harness import running_gateway, write_config
from gateway.testing.issuer import TestIssuer
from gateway.testing.upstream import FakeUpstream
from tests.stories import TIKTOK, tiktok_ban


@pytest.fixture(scope="module")
def issuer() -> TestIssuer:
    return TestIssuer.generate("k1")


@pytest.mark.slow
async def test_locked_store_gives_451_4_3_0_and_no_row(tmp_path: Path, issuer: TestIssuer) -> None:
    async with FakeUpstream.running() as upstream:
        config = write_config(
            tmp_path,
            issuer=issuer,
            upstream_port=upstream.port,
            policies={"ban.toml": tiktok_ban("hold", phones_only=False)},
        )
        async with running_gateway(config) as gateway:
            locker = sqlite3.connect(str(gateway.settings.hold.database), isolation_level=None)
            locker.execute("BEGIN EXCLUSIVE")  # another process holds the write lock
            try:
                result = await FakeDevice(issuer, apps={TIKTOK}).send(gateway.port, timeout=30)
            finally:
                locker.execute("ROLLBACK")
                locker.close()
            assert result.data == (451, "4.3.0 Temporary storage failure; please try again later")
            assert held_rows(gateway.settings.hold.database) == []
            # And once the lock is gone, holding works again.
            again = await FakeDevice(issuer, apps={TIKTOK}).send(gateway.port)
            assert again.data == (250, "2.6.0 held: Remove TikTok.")


async def test_expired_held_mail_bounces_with_a_dsn(tmp_path: Path, issuer: TestIssuer) -> None:
    clock = [datetime.now(UTC)]
    async with FakeUpstream.running() as upstream:
        config = write_config(
            tmp_path, issuer=issuer, upstream_port=upstream.port, policies={"ban.toml": tiktok_ban("hold", phones_only=False)},
            extra='expire_after_hours = 1\n',
        )  # fmt: skip
        async with running_gateway(config, clock=lambda: clock[0]) as gateway:
            assert (await FakeDevice(issuer, apps={TIKTOK}).send(gateway.port)).data == (
                250,
                "2.6.0 held: Remove TikTok.",
            )
            clock[0] += timedelta(hours=2)
            (bounce,) = await upstream.wait_for(1)
            async with asyncio.timeout(5):  # the row goes right after the bounce's 250
                while held_rows(gateway.settings.hold.database):  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
    assert bounce.sender == ""  # null reverse-path: bounces never bounce
    assert bounce.recipients == ("alice@example.test",)
    assert b"Content-Type: multipart/report; report-type=delivery-status" in bounce.content
    assert (
        b"Final-Recipient: rfc822; bob@example.test\r\nAction: failed\r\nStatus: 5.7.1"
        in bounce.content
    )


async def test_a_hold_below_the_free_space_floor_gets_452_4_3_1_and_no_row(
    tmp_path: Path, issuer: TestIssuer
) -> None:
    """Defect 6's second half: a floor for the store's disk (Postfix's queue_minfree),
    checked with the disk's real free space; the client keeps its message."""
    async with FakeUpstream.running() as upstream:
        config = write_config(
            tmp_path, issuer=issuer, upstream_port=upstream.port,
            policies={"ban.toml": tiktok_ban("hold", phones_only=False)},
            hold={"min_free_bytes": 2**62},  # more than any disk here has free
        )  # fmt: skip
        async with running_gateway(config) as gateway:
            result = await FakeDevice(issuer, apps={TIKTOK}).send(gateway.port)
            assert result.data == (452, "4.3.1 Insufficient system storage; please try again later")
            assert held_rows(gateway.settings.hold.database) == []
            # Allowed mail is not held, so it is not refused.
            assert (await FakeDevice(issuer).send(gateway.port)).accepted
