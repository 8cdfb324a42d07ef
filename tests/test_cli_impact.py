"""`gateway impact` says which inventory it read, refuses to report on none, and fails
when the reload guard would refuse the change it previews."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.config.settings import load_settings
from gateway.domain import Access, Device, DeviceClaims, DeviceClass, Platform
from gateway.hold.store import HoldStore
from tests.stories import TIKTOK

REPO = Path(__file__).resolve().parent.parent
NOW = datetime(2020, 7, 12, 10, 0, tzinfo=UTC)  # the shipped ban is in force


@pytest.fixture
def config(tmp_path: Path) -> Path:
    shutil.copytree(REPO / "config", tmp_path / "config")
    return tmp_path / "config" / "gateway.toml"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def phone(device_id: str) -> DeviceClaims:
    return DeviceClaims(
        issuer="https://mdm.example.test",
        subject=f"{device_id}@example.test",
        audience=("gw",),
        issued_at=NOW,
        expires_at=NOW + timedelta(hours=1),
        device=Device(device_id, Platform.IOS, DeviceClass.MOBILE),
        apps=frozenset({TIKTOK}),
    )


def inventory(config: Path, *devices: str, seen: datetime = NOW) -> Path:
    path = load_settings(config).hold.database
    store = HoldStore(path)
    try:
        store.record_devices([(phone(d), seen.timestamp(), Access.SEND) for d in devices])
    finally:
        store.close()
    return path


def impact(capsys: pytest.CaptureFixture[str], config: Path, *flags: str) -> tuple[int, str, str]:
    return run(capsys, "impact", "--at", NOW.isoformat(), "--config", str(config), *flags)


def test_missing_inventory_is_refused_not_zero_devices(
    capsys: pytest.CaptureFixture[str], config: Path
) -> None:
    database = load_settings(config).hold.database
    code, out, err = impact(capsys, config)
    assert code == 2
    assert out == ""
    assert f"gateway: impact: no device inventory at {database}" in err
    assert not database.exists()  # impact never creates an empty store
    code, out, _ = impact(capsys, config, "--json")
    report = json.loads(out)
    assert code == 2
    assert report["schema"] == 1
    assert report["ok"] is False
    assert report["inventory"]["source"] == str(database)


def test_empty_inventory_is_refused(capsys: pytest.CaptureFixture[str], config: Path) -> None:
    database = inventory(config, "old-phone", seen=NOW - timedelta(days=90))
    code, _, err = impact(capsys, config)
    assert code == 2
    assert f"the inventory at {database} has no device seen since" in err
    assert "(1 seen before then)" in err


def test_impact_names_its_inventory(capsys: pytest.CaptureFixture[str], config: Path) -> None:
    database = inventory(config, "p1")
    code, out, err = impact(capsys, config)
    assert code == 0, err
    assert (
        f"1 device(s) seen in the last 30 days, at {NOW.isoformat()} (inventory: {database})" in out
    )
    code, out, _ = impact(capsys, config, "--json")
    report = json.loads(out)
    assert report["inventory"] == {
        "source": str(database),
        "seen_since": (NOW - timedelta(days=30)).isoformat(),
        "retention_days": 30,
        "devices": 1,
    }
    assert report["guard"] == {"limit": 50, "refused": False, "reason": None}
    assert report["ok"] is True


def test_another_inventory_can_be_named(
    capsys: pytest.CaptureFixture[str], config: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "copy.db"
    shutil.copy(inventory(config, "p1", "p2"), copy)
    code, out, _ = impact(capsys, config, "--json", "--inventory", str(copy))
    assert code == 0
    assert json.loads(out)["inventory"]["devices"] == 2


def test_impact_fails_when_the_guard_would_refuse(
    capsys: pytest.CaptureFixture[str], config: Path
) -> None:
    config.write_text(
        config.read_text().replace(
            "max_newly_blocked_devices = 50", "max_newly_blocked_devices = 1"
        )
    )
    inventory(config, "p1", "p2")
    code, out, _ = impact(capsys, config)
    assert code == 1
    assert (
        "guard: the reload will be refused: this change would newly hold or reject 2 devices (limit 1)"
        in out
    )
    code, out, _ = impact(capsys, config, "--json")
    report = json.loads(out)
    assert code == 1
    assert report["ok"] is False
    assert report["guard"]["refused"] is True
    assert "newly hold or reject 2 devices (limit 1)" in report["guard"]["reason"]


def test_impact_reports_each_rollout_stage(
    capsys: pytest.CaptureFixture[str], config: Path
) -> None:
    """A staged rollout: the preview says, stage by stage, on how many of the matching
    devices it enforces, and which stage is in force now."""
    policy = config.parent / "policies" / "remove-tiktok.toml"
    policy.write_text(
        policy.read_text() + "\n[[policy.rollout.stage]]\nat = 2020-07-11T00:00:00Z\npercent = 10\n"
        "[[policy.rollout.stage]]\nat = 2020-07-20T00:00:00Z\npercent = 100\n"
    )
    inventory(config, *(f"phone-{n:03d}" for n in range(200)))
    code, out, err = impact(capsys, config)
    assert code == 0, err
    lines = [line for line in out.splitlines() if line.startswith("rollout ")]
    assert len(lines) == 2
    assert lines[0].startswith(
        "rollout remove-tiktok: 10% from 2020-07-11T00:00:00+00:00: enforced on "
    )
    assert lines[0].endswith(" of 200 matching device(s)  <- now")
    assert lines[1] == (
        "rollout remove-tiktok: 100% from 2020-07-20T00:00:00+00:00: "
        "enforced on 200 of 200 matching device(s)"
    )
    code, out, _ = impact(capsys, config, "--json")
    stages = json.loads(out)["rollout_stages"]
    assert [s["current"] for s in stages] == [True, False]
    assert 10 <= stages[0]["enforced"] <= 30
    # The preview agrees with the decisions: only the devices in the stage are newly held.
    assert len(json.loads(out)["newly_held"]) == stages[0]["enforced"]


def test_impact_shows_who_the_announcement_tells(
    capsys: pytest.CaptureFixture[str], config: Path
) -> None:
    """In the announce phase the preview lists the users the announcement warns at once:
    phones with the app, not a laptop with it."""
    path = inventory(config, "phone-1", "phone-2")
    store = HoldStore(path)
    laptop = phone("laptop-1")
    laptop = DeviceClaims(
        laptop.issuer, laptop.subject, laptop.audience, laptop.issued_at, laptop.expires_at,
        Device("laptop-1", Platform.MACOS, DeviceClass.DESKTOP), laptop.apps,
    )  # fmt: skip
    store.record_devices([(laptop, NOW.timestamp(), Access.SEND)])
    store.close()
    announced = "2020-07-10T12:00:00-07:00"  # between the shipped ban's announce_at and enforce_at
    code, out, err = run(capsys, "impact", "--at", announced, "--config", str(config), "--json")
    assert code == 0, err
    assert json.loads(out)["announced_to"] == [
        {"user": "phone-1@example.test", "device_id": "phone-1", "policy_id": "remove-tiktok"},
        {"user": "phone-2@example.test", "device_id": "phone-2", "policy_id": "remove-tiktok"},
    ]
    code, out, _ = run(capsys, "impact", "--at", announced, "--config", str(config))
    assert "announced to:    2 device(s), 2 user(s)" in out
    assert "laptop-1" not in out
