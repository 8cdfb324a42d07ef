"""Release over real sockets: pages, lanes and batched deletes keep each device's order."""

from __future__ import annotations

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


async def test_release_pages_lanes_and_batched_deletes_keep_each_devices_order(
    tmp_path: Path, issuer: TestIssuer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Small pages and delete batches force every path: a device whose mail stays held
    blocks only its own lane; the others are released in their own arrival order."""
    from gateway.hold import release

    monkeypatch.setattr(release, "PAGE_SIZE", 2)
    monkeypatch.setattr(release, "DELETE_BATCH", 3)
    async with FakeUpstream.running() as upstream:
        config = write_config(
            tmp_path, issuer=issuer, upstream_port=upstream.port, policies={"ban.toml": BAN}
        )
        async with running_gateway(config, release_tick=60) as gateway:
            devices = {
                name: FakeDevice(
                    issuer, user=f"{name}@example.test", device_id=f"{name}-phone", apps={TIKTOK}
                )
                for name in ("ann", "ben", "cat")
            }
            order = ["ann", "ben", "cat", "ben", "ann", "cat", "ben", "cat", "ben"]
            sent: dict[str, list[bytes]] = {name: [] for name in devices}
            for n, name in enumerate(order):
                content = make_message(subject=f"{name} #{n}", sender=f"{name}@example.test")
                sent[name].append(content)
                assert (await devices[name].send(gateway.port, message=content)).data == (
                    250,
                    "2.6.0 held: Remove TikTok.",
                )
            # Exempt Ben and Cat; Ann stays held.
            exempt = 'exempt.users = ["ben@example.test", "cat@example.test"]\n'
            (gateway.policy_dir / "ban.toml").write_text(tiktok_ban("hold", extra=exempt))
            await gateway.server.reload("test")
            report = await gateway.server.services.releaser.run()
            assert len(report.released) == 7
            assert report.still_held == 2
            for name in ("ben", "cat"):
                got = [
                    m.content[m.content.index(b"From: ") :]
                    for m in upstream.messages
                    if m.sender == f"{name}@example.test"
                ]
                assert got == sent[name]
            left = held_rows(gateway.settings.hold.database)
            assert [h.user for h in left] == ["ann@example.test", "ann@example.test"]


async def test_release_reads_bodies_for_several_lanes_in_one_query(
    tmp_path: Path, issuer: TestIssuer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One device with ten held messages, then twelve devices with one each: the first
    batches of consecutive lanes are read together, a long lane's later batches on their
    own, each query at most READ_BATCH_MESSAGES bodies; every message goes out whole and
    in its device's order."""
    from gateway.hold import release

    monkeypatch.setattr(release, "READ_BATCH_MESSAGES", 4)
    async with FakeUpstream.running() as upstream:
        config = write_config(
            tmp_path, issuer=issuer, upstream_port=upstream.port, policies={"ban.toml": BAN}
        )
        async with running_gateway(config, release_tick=60) as gateway:
            sent: dict[str, list[bytes]] = {}
            senders = ["long"] * 10 + [f"short{n}" for n in range(12)]
            for n, name in enumerate(senders):
                device = FakeDevice(
                    issuer, user=f"{name}@example.test", device_id=f"{name}-phone", apps={TIKTOK}
                )
                content = make_message(subject=f"{name} #{n}", sender=f"{name}@example.test")
                sent.setdefault(name, []).append(content)
                assert (await device.send(gateway.port, message=content)).accepted
            releaser = gateway.server.services.releaser
            reads: list[int] = []
            contents = releaser.store.contents

            async def counted(hold_ids: list[str]) -> dict[str, bytes]:
                reads.append(len(hold_ids))
                return await contents(hold_ids)

            monkeypatch.setattr(releaser.store, "contents", counted)
            (gateway.policy_dir / "ban.toml").write_text(tiktok_ban("hold", state="retracted"))
            await gateway.server.reload("test")
            await releaser.idle()
            await releaser.run()  # whatever the reload's own pass left
            await upstream.wait_for(len(senders))
    # The long lane's first four; three groups of four short lanes; its next four and two.
    assert sorted(reads) == sorted([4, 4, 4, 4, 4, 2]), reads
    for name, contents_sent in sent.items():
        got = [
            m.content[m.content.index(b"From: ") :]
            for m in upstream.messages
            if m.sender == f"{name}@example.test"
        ]
        assert got == contents_sent
