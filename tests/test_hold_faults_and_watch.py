"""Hold store faults, expiry bounces, and the directory watcher (no explicit reloads here)."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway.hold.store import HoldStore
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
            assert HoldStore(gateway.settings.hold.database).select() == []
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
                while HoldStore(gateway.settings.hold.database).select():  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
    assert bounce.sender == ""  # null reverse-path: bounces never bounce
    assert bounce.recipients == ("alice@example.test",)
    assert b"Content-Type: multipart/report; report-type=delivery-status" in bounce.content
    assert (
        b"Final-Recipient: rfc822; bob@example.test\r\nAction: failed\r\nStatus: 5.7.1"
        in bounce.content
    )


async def _wait_for_version_change(gateway_server: object, old: str) -> str:
    async with asyncio.timeout(5):
        while (version := gateway_server.services.policies.current.version) == old:  # type: ignore[attr-defined]  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    return version  # type: ignore[no-any-return]


async def test_watcher_handles_rename_save_truncate_write_and_delete(
    tmp_path: Path, issuer: TestIssuer
) -> None:
    async with FakeUpstream.running() as upstream:
        config = write_config(
            tmp_path,
            issuer=issuer,
            upstream_port=upstream.port,
            policies={"ban.toml": tiktok_ban("reject", phones_only=False)},
        )
        async with running_gateway(config) as gateway:
            phone = FakeDevice(issuer, apps={TIKTOK})
            server = gateway.server
            await asyncio.sleep(0.3)  # let the watcher arm
            policy = gateway.policy_dir / "ban.toml"

            # An editor's rename-save: write a temporary file, rename it over the original.
            version = server.services.policies.current.version
            temporary = gateway.policy_dir / ".ban.toml.swp"
            temporary.write_text(tiktok_ban("defer", phones_only=False))
            os.replace(temporary, policy)
            version = await _wait_for_version_change(server, version)
            assert (await phone.send(gateway.port)).mail == (451, "4.7.1 Remove TikTok.")

            # Truncate, then write: the half-way state is invalid and must be ignored.
            with policy.open("w") as handle:
                handle.truncate(0)
                handle.flush()
                await asyncio.sleep(0.3)
                handle.write(tiktok_ban("warn", phones_only=False))
            version = await _wait_for_version_change(server, version)
            assert (await phone.send(gateway.port)).data == (
                250,
                "2.0.0 Message accepted. NOTICE: Remove TikTok.",
            )

            # Deleting the file removes the policy.
            policy.unlink()
            await _wait_for_version_change(server, version)
            assert server.services.policies.last_result is not None
            assert server.services.policies.last_result.diff.removed == ("remove-tiktok",)
            assert (await phone.send(gateway.port)).data == (
                250,
                "2.0.0 Message accepted for delivery",
            )
