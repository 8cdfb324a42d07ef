"""Device inventory, `gateway impact`, and the blast-radius guard on reload."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest

from gateway.cli import main
from gateway.domain import Access, Action, Device, DeviceClaims, DeviceClass, Platform, PolicyState
from gateway.policy.diff import PolicyDiff
from gateway.policy.engine import CompiledPolicySet, compile_policy_set
from gateway.policy.impact import assess, blast_radius_refusal
from gateway.policy.model import Conditions, Policy, PolicySet
from gateway.testing.device import FakeDevice
from gateway.testing.harness import running_gateway, write_config
from gateway.testing.issuer import TestIssuer
from gateway.testing.upstream import FakeUpstream
from tests.stories import TIKTOK, tiktok_ban
from tests.sync.test_dovecot import introspect, write_secrets

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


# --- scope.access --------------------------------------------------------------------

NOW = datetime(2020, 7, 11, 12, tzinfo=UTC)
SEND, SYNC = frozenset({Access.SEND}), frozenset({Access.SYNC})
HOLD_TIKTOK = Policy(
    id="remove-tiktok",
    action=Action.HOLD,
    state=PolicyState.ENFORCE,
    message="Remove TikTok.",
    match=Conditions(apps_any=frozenset({TIKTOK})),
)


def phone(device_id: str, user: str = "alice@example.test") -> DeviceClaims:
    return DeviceClaims(
        issuer="i", subject=user, audience=("gw",), issued_at=NOW,
        expires_at=NOW + timedelta(hours=1),
        device=Device(device_id, Platform.IOS, DeviceClass.MOBILE), apps=frozenset({TIKTOK}),
    )  # fmt: skip


def compiled(*policies: Policy) -> CompiledPolicySet:
    return compile_policy_set(PolicySet(policies, "v"))


def rows(report_rows: object) -> list[tuple[str, list[str]]]:
    assert isinstance(report_rows, list)
    return [(r["device_id"], r["access"]) for r in report_rows]


def test_impact_of_a_sync_only_ban_names_the_access_it_changes() -> None:
    """Without ``accesses_of`` (an inventory from before sends and syncs were told
    apart), every device counts as both."""
    devices = [phone("p1"), phone("p2", "bob@example.test")]
    report = assess(compiled(), compiled(replace(HOLD_TIKTOK, access=SYNC)), devices, NOW)
    found = report.as_dict()
    assert rows(found["newly_held"]) == [("p1", ["sync"]), ("p2", ["sync"])]
    assert found["newly_blocked_devices"] == 2
    # The default (both) reports one row per device naming both accesses.
    found = assess(compiled(), compiled(HOLD_TIKTOK), devices, NOW).as_dict()
    assert rows(found["newly_held"]) == [("p1", ["send", "sync"]), ("p2", ["send", "sync"])]


def test_impact_counts_only_the_devices_that_use_the_access_a_policy_gates() -> None:
    """With an inventory that knows what each device does, a send-only ban does not count
    a phone that only syncs, and a sync-only ban counts it."""
    devices = [phone("sender"), phone("syncer"), phone("both")]
    uses = {"sender": SEND, "syncer": SYNC, "both": SEND | SYNC}

    def accesses_of(claims: DeviceClaims) -> frozenset[Access]:
        return uses[claims.device.id]

    send_ban = compiled(replace(HOLD_TIKTOK, access=SEND))
    report = assess(compiled(), send_ban, devices, NOW, accesses_of)
    assert report.devices == 3
    assert rows(report.as_dict()["newly_held"]) == [("sender", ["send"]), ("both", ["send"])]
    sync_ban = compiled(replace(HOLD_TIKTOK, access=SYNC))
    report = assess(compiled(), sync_ban, devices, NOW, accesses_of)
    assert rows(report.as_dict()["newly_held"]) == [("syncer", ["sync"]), ("both", ["sync"])]
    # Moving a ban from sending to syncing releases senders and holds syncers.
    report = assess(send_ban, sync_ban, devices, NOW, accesses_of)
    assert rows(report.as_dict()["released"]) == [("sender", ["send"]), ("both", ["send"])]
    assert rows(report.as_dict()["newly_held"]) == [("syncer", ["sync"]), ("both", ["sync"])]


def test_the_guard_counts_a_device_blocked_for_both_accesses_once() -> None:
    candidate = compiled(
        replace(HOLD_TIKTOK, access=SEND),
        replace(HOLD_TIKTOK, id="no-sync", action=Action.REJECT, access=SYNC),
    )
    report = assess(compiled(), candidate, [phone("p1"), phone("p2")], NOW)
    assert len(report.newly_blocked) == 4  # held for sending, rejected for syncing, twice
    assert report.newly_blocked_devices == 2
    diff = PolicyDiff.between(compiled().source, candidate.source)
    assert blast_radius_refusal(report, candidate, diff, limit=2) is None
    refusal = blast_radius_refusal(report, candidate, diff, limit=1)
    assert refusal is not None
    assert "would newly hold or reject 2 devices (limit 1)" in refusal


async def test_impact_counts_the_phones_that_only_sync(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The inventory records what each device was seen doing: a phone that only syncs
    (its mail app logs in through the sync endpoint, it never sends) counts for a
    sync-only ban, and a tablet that only sends does not; a send-only ban the reverse."""
    issuer = TestIssuer.generate("k1")
    phone, tablet, *_ = fleet(issuer)
    async with FakeUpstream.running() as upstream:
        config = write_config(
            tmp_path, issuer=issuer, upstream_port=upstream.port, sync=write_secrets(tmp_path)
        )
        async with (
            running_gateway(config) as gateway,
            aiohttp.ClientSession(
                base_url=f"http://127.0.0.1:{gateway.sync_port}",
                timeout=aiohttp.ClientTimeout(total=10),
            ) as client,
        ):
            status, body = await introspect(client, phone.token())
            assert (status, body["active"]) == (200, True)
            assert (await tablet.send(gateway.port)).accepted
        candidate = tmp_path / "candidate"
        shutil.copytree(tmp_path / "policies", candidate)
        (candidate / "ban.toml").write_text(BAN + 'scope.access = ["sync"]\n')
        capsys.readouterr()
        assert main(["impact", str(candidate), "--config", str(config)]) == 0
        out = capsys.readouterr().out
        assert "2 device(s) seen" in out
        assert "each device counts for what it was seen doing" in out
        assert "newly held:      1 device(s), 1 user(s)" in out
        (held,) = [line for line in out.splitlines() if "alice-phone" in line]
        assert " sync " in held
        assert "allow -> hold  remove-tiktok" in held
        assert main(["impact", str(candidate), "--json", "--config", str(config)]) == 0
        report = json.loads(capsys.readouterr().out)
        assert rows(report["newly_held"]) == [("alice-phone", ["sync"])]
        (candidate / "ban.toml").write_text(BAN + 'scope.access = ["send"]\n')
        assert main(["impact", str(candidate), "--json", "--config", str(config)]) == 0
        report = json.loads(capsys.readouterr().out)
        assert rows(report["newly_held"]) == [("carol-tablet", ["send"])]
