"""The directory watcher: every way an editor or tool saves a file (no explicit reloads here)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from gateway.testing.device import FakeDevice
from gateway.testing.harness import running_gateway, write_config
from gateway.testing.issuer import TestIssuer
from gateway.testing.upstream import FakeUpstream
from tests.stories import TIKTOK, tiktok_ban


@pytest.fixture(scope="module")
def issuer() -> TestIssuer:
    return TestIssuer.generate("k1")


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
