"""Hot reload triggers: a change is applied only once the file is complete."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from gateway.testing.device import FakeDevice
from gateway.testing.harness import gateway_with_upstream
from gateway.testing.issuer import TestIssuer
from tests.stories import TIKTOK


@pytest.mark.slow
async def test_a_file_written_in_two_parts_is_not_enforced_half_way(
    tmp_path: Path, test_issuer: TestIssuer
) -> None:
    """A tool writes a ban in two parts, 1 s apart; the first part alone is a broader ban
    (no scope, enforced) than the whole file (phones only, audit). A laptop sending all
    the while must never be refused."""
    draft = '[[policy]]\nid = "other"\nmatch.apps_any = ["com.example.other"]\naction = "warn"\nstate = "draft"\n'
    issuer = test_issuer
    async with gateway_with_upstream(tmp_path, issuer, {"other.toml": draft}) as (gateway, _):
        await asyncio.sleep(0.3)  # let the watcher arm
        laptop = FakeDevice(issuer, device_id="laptop-1", apps={TIKTOK}, device_class="desktop")
        version = gateway.server.services.policies.current.version
        ban = gateway.policy_dir / "ban.toml"
        with ban.open("w") as handle:
            handle.write(
                f'[[policy]]\nid = "remove-tiktok"\nmatch.apps_any = ["{TIKTOK}"]\n'
                'action = "reject"\nmessage = "Remove TikTok."\n'
            )
            handle.flush()
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:  # the laptop keeps sending in the gap
                assert (await laptop.send(gateway.port)).mail[0] == 250
                await asyncio.sleep(0.1)
            handle.write('scope.device_class = ["mobile", "tablet"]\nstate = "audit"\n')
        async with asyncio.timeout(10):
            while gateway.server.services.policies.current.version == version:
                assert (await laptop.send(gateway.port)).mail[0] == 250
                await asyncio.sleep(0.1)
        policy = gateway.server.services.policies.current.source.by_id()["remove-tiktok"]
        assert policy.state.value == "audit"
        assert (await laptop.send(gateway.port)).data[0] == 250
