"""Device inventory, `gateway impact`, and the blast-radius guard on reload."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.testing.device import FakeDevice
from gateway.testing.harness import running_gateway, write_config
from gateway.testing.issuer import TestIssuer
from gateway.testing.upstream import FakeUpstream
from tests.stories import TIKTOK, tiktok_ban

BAN = tiktok_ban("hold")


def fleet(issuer: TestIssuer) -> list[FakeDevice]:
    return [
        FakeDevice(issuer, user="alice@example.test", device_id="alice-phone", apps={TIKTOK}),
        FakeDevice(issuer, user="carol@example.test", device_id="carol-tablet", device_class="tablet", platform="ipados", apps={TIKTOK}),
        FakeDevice(issuer, user="alice@example.test", device_id="alice-laptop", device_class="desktop", platform="macos", apps={TIKTOK}),
        FakeDevice(issuer, user="bob@example.test", device_id="bob-phone", platform="android"),
    ]  # fmt: skip


async def test_impact_preview_counts_match_the_inventory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    issuer = TestIssuer.generate("k1")
    async with FakeUpstream.running() as upstream:
        config = write_config(tmp_path, issuer=issuer, upstream_port=upstream.port)
        async with running_gateway(config) as gateway:
            for device in fleet(issuer):
                assert (await device.send(gateway.port)).data is not None
        # The inventory is flushed at shutdown; now preview the ban against it.
        candidate = tmp_path / "candidate"
        shutil.copytree(tmp_path / "policies", candidate)
        (candidate / "ban.toml").write_text(BAN)
        capsys.readouterr()  # drop the gateway's own log lines
        assert main(["impact", str(candidate), "--json", "--config", str(config)]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["devices_considered"] == 4
        assert sorted(r["device_id"] for r in report["newly_held"]) == [
            "alice-phone",
            "carol-tablet",
        ]
        assert report["newly_blocked_devices"] == 2
        assert report["released"] == []

        # And the retraction, previewed against the ban in force: both released.
        (tmp_path / "policies" / "ban.toml").write_text(BAN)
        retracted = tmp_path / "retracted"
        retracted.mkdir()
        (retracted / "ban.toml").write_text(tiktok_ban("hold", state="retracted"))
        assert main(["impact", str(retracted), "--config", str(config)]) == 0
        out = capsys.readouterr().out
        assert "newly held:      0 device(s)" in out
        assert "released:        2 device(s), 2 user(s)" in out


async def test_guard_refuses_an_over_broad_ban_until_confirmed(tmp_path: Path) -> None:
    issuer = TestIssuer.generate("k1")
    async with FakeUpstream.running() as upstream:
        config = write_config(tmp_path, issuer=issuer, upstream_port=upstream.port)
        config.write_text(
            config.read_text().replace("[gateway]\n", "[gateway]\nmax_newly_blocked_devices = 1\n")
        )
        async with running_gateway(config) as gateway:
            devices = fleet(issuer)
            for device in devices:
                assert (await device.send(gateway.port)).data is not None
            ban = gateway.policy_dir / "ban.toml"
            ban.write_text(BAN)
            refused = await gateway.server.reload("test")
            assert not refused.ok
            assert "would newly hold or reject 2 devices (limit 1)" in str(refused.problems[0])
            result = await devices[0].send(gateway.port)
            assert result.data == (
                250,
                "2.0.0 Message accepted for delivery",
            )  # the old set still serves

            ban.write_text(tiktok_ban("hold", extra="confirm_impact = 2\n"))
            accepted = await gateway.server.reload("test")
            assert accepted.ok
            assert accepted.diff.added == ("remove-tiktok",)
            assert (await devices[0].send(gateway.port)).data == (250, "2.6.0 held: Remove TikTok.")
