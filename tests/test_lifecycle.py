"""The policy lifecycle over real sockets: hold, release on compliance, retraction by a
ConfigMap-style symlink swap, invalid edits, and reloads under load."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from gateway.hold.store import held_rows
from gateway.testing.device import FakeDevice, make_message
from gateway.testing.harness import running_gateway, write_config
from gateway.testing.issuer import TestIssuer
from gateway.testing.upstream import FakeUpstream
from tests.stories import TIKTOK, tiktok_ban

BAN = tiktok_ban("hold")


@pytest.fixture(scope="module")
def issuer() -> TestIssuer:
    return TestIssuer.generate("k1")


def configmap(directory: Path, files: dict[str, str], generation: int) -> None:
    """Lay out a directory the way the kubelet does and swap ``..data`` atomically."""
    stamp = directory / f"..2026_11_24_{generation:06d}"
    stamp.mkdir()
    for name, text in files.items():
        (stamp / name).write_text(text)
    tmp_link = directory / "..data_tmp"
    os.symlink(stamp.name, tmp_link)
    os.replace(tmp_link, directory / "..data")  # the atomic swap
    for name in files:
        link = directory / name
        if not link.is_symlink():
            os.symlink(f"..data/{name}", link)


async def test_the_story_end_to_end(tmp_path: Path, issuer: TestIssuer) -> None:
    async with FakeUpstream.running() as upstream:
        config = write_config(tmp_path, issuer=issuer, upstream_port=upstream.port)
        policy_dir = tmp_path / "policies"
        configmap(policy_dir, {"ban.toml": BAN}, 1)
        async with running_gateway(config) as gateway:
            alice = FakeDevice(
                issuer, user="alice@example.test", device_id="alice-phone", apps={TIKTOK}
            )
            carol = FakeDevice(
                issuer, user="carol@example.test", device_id="carol-phone", apps={TIKTOK}
            )
            sent: list[bytes] = []
            for n in range(3):
                for device in (alice, carol):
                    content = make_message(subject=f"{device.user} #{n}", sender=device.user)
                    sent.append(content)
                    result = await device.send(gateway.port, message=content)
                    assert result.data == (250, "2.6.0 held: Remove TikTok.")
            assert upstream.messages == []
            assert len(held_rows(gateway.settings.hold.database)) == 6

            # Alice complies: removing the app and authenticating again releases her mail.
            alice.remove(TIKTOK)
            assert (
                await alice.send(gateway.port, message=make_message(subject="alice after"))
            ).data is not None
            await upstream.wait_for(4)
            await asyncio.sleep(0.5)  # and nothing of Carol's follows
            # Held mail first, in arrival order, then the new message: the device's order holds.
            alice_mail = [m.content[m.content.index(b"From: ") :] for m in upstream.messages]
            assert alice_mail[:3] == [c for c in sent if b"alice" in c]
            assert b"Subject: alice after" in alice_mail[3]
            assert all(m.sender == "alice@example.test" for m in upstream.messages)

            # Retraction by ConfigMap swap: Carol's held mail reaches the upstream within 5 s.
            started = time.monotonic()
            configmap(
                policy_dir, {"ban.toml": BAN.replace('state = "enforce"', 'state = "retracted"')}, 2
            )
            await upstream.wait_for(7, timeout=5)
            elapsed = time.monotonic() - started
            assert elapsed < 5
            carols = [m for m in upstream.messages if m.sender == "carol@example.test"]
            expected = [c for c in sent if b"carol" in c]
            # Byte-identical after the gateway's own Received header, and in arrival order.
            assert [m.content[m.content.index(b"From: ") :] for m in carols] == expected
            # Rows go only after the upstream's 250 (at least once), so allow a moment.
            async with asyncio.timeout(5):
                while held_rows(gateway.settings.hold.database):  # noqa: ASYNC110  # polls another process's view of the SQLite file
                    await asyncio.sleep(0.05)


async def test_invalid_edit_keeps_the_last_good_set(tmp_path: Path, issuer: TestIssuer) -> None:
    async with FakeUpstream.running() as upstream:
        config = write_config(
            tmp_path,
            issuer=issuer,
            upstream_port=upstream.port,
            policies={"ban.toml": BAN.replace("hold", "reject")},
        )
        async with running_gateway(config) as gateway:
            phone = FakeDevice(issuer, apps={TIKTOK})
            assert (await phone.send(gateway.port)).mail == (550, "5.7.1 Remove TikTok.")
            version = gateway.server.services.policies.current.version
            (gateway.policy_dir / "ban.toml").write_text(
                BAN.replace("match.apps_any", "match.apps_anyy").replace(
                    'state = "enforce"', 'state = "retracted"'
                )
            )
            result = await gateway.server.reload("test")
            assert not result.ok
            assert "apps_anyy: unknown key" in str(result.problems[0])
            assert gateway.server.services.policies.current.version == version
            assert (await phone.send(gateway.port)).mail == (550, "5.7.1 Remove TikTok.")


async def test_reloads_during_continuous_sending_fail_no_transaction(
    tmp_path: Path, issuer: TestIssuer
) -> None:
    async with FakeUpstream.running() as upstream:
        config = write_config(
            tmp_path, issuer=issuer, upstream_port=upstream.port, policies={"ban.toml": BAN}
        )
        async with running_gateway(config) as gateway:
            stop = asyncio.Event()
            failures: list[object] = []
            sent = 0

            async def sender(n: int) -> None:
                nonlocal sent
                device = FakeDevice(issuer, user="alice@example.test", device_id=f"d{n}")
                while not stop.is_set():
                    result = await device.send(gateway.port)
                    if result.data is None or result.data[0] != 250:
                        failures.append(result)
                    sent += 1

            senders = [asyncio.create_task(sender(n)) for n in range(4)]
            policy = gateway.policy_dir / "ban.toml"
            for i in range(100):
                policy.write_text(BAN.replace("Remove TikTok.", f"Remove TikTok ({i})."))
                result = await gateway.server.reload("test")
                assert result.ok
                await asyncio.sleep(0)
            stop.set()
            await asyncio.gather(*senders)
            assert failures == []
            assert sent > 0
            assert len(upstream.messages) == sent
