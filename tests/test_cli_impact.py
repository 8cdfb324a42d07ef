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
    told = json.loads(out)["notices"]
    assert told["enabled"] is True
    assert told["announced"] == {
        "notices": 2,
        "users": 2,
        "devices": 2,
        "rows": [
            {"user": "phone-1@example.test", "device_id": "phone-1", "policy_id": "remove-tiktok"},
            {"user": "phone-2@example.test", "device_id": "phone-2", "policy_id": "remove-tiktok"},
        ],
    }
    assert told["withdrawn"]["notices"] == 0
    code, out, _ = run(capsys, "impact", "--at", announced, "--config", str(config))
    assert "announced to:    2 device(s), 2 user(s)" in out
    assert "laptop-1" not in out
    # Phone 1 was told already (the notices table): the preview leaves it out.
    store = HoldStore(path)
    store.claim_notice("phone-1", "remove-tiktok", "warn", NOW)
    store.close()
    code, out, _ = run(capsys, "impact", "--at", announced, "--config", str(config), "--json")
    assert [r["device_id"] for r in json.loads(out)["notices"]["announced"]["rows"]] == ["phone-2"]


def retract(config: Path) -> Path:
    """A copy of the live policies with the shipped ban retracted: the candidate."""
    candidate = config.parent / "candidate"
    shutil.copytree(config.parent / "policies", candidate)
    ban = candidate / "remove-tiktok.toml"
    ban.write_text(
        ban.read_text().replace(
            'state = "enforce"', 'state = "retracted"\nretracted_reason = "sent in error"'
        )
    )
    return candidate


def test_impact_shows_who_a_retraction_tells_to_disregard(
    capsys: pytest.CaptureFixture[str], config: Path
) -> None:
    """A retraction: the users told about the ban (warn, hold or released) are listed for
    the "disregard" notice, and nobody else; one already told so is not listed again."""
    path = inventory(config, "phone-1", "phone-2", "phone-3")
    store = HoldStore(path)
    store.claim_notice("phone-1", "remove-tiktok", "warn", NOW)
    store.claim_notice("phone-1", "remove-tiktok", "hold", NOW)
    store.claim_notice("phone-2", "remove-tiktok", "released", NOW)
    store.claim_notice("phone-3", "another-policy", "warn", NOW)
    store.close()
    candidate = retract(config)
    code, out, err = impact(capsys, config, str(candidate), "--json")
    assert code == 0, err
    report = json.loads(out)
    assert [r["device_id"] for r in report["released"]] == ["phone-1", "phone-2", "phone-3"]
    assert report["notices"]["withdrawn"] == {
        "notices": 2,
        "users": 2,
        "devices": 2,
        "rows": [
            {"user": "phone-1@example.test", "device_id": "phone-1", "policy_id": "remove-tiktok"},
            {"user": "phone-2@example.test", "device_id": "phone-2", "policy_id": "remove-tiktok"},
        ],
    }
    assert report["notices"]["announced"]["notices"] == 0
    code, out, _ = impact(capsys, config, str(candidate))
    assert "withdrawn to:    2 device(s), 2 user(s)" in out
    store = HoldStore(path)
    store.claim_notice("phone-2", "remove-tiktok", "withdrawn", NOW)
    store.close()
    code, out, _ = impact(capsys, config, str(candidate), "--json")
    assert [r["device_id"] for r in json.loads(out)["notices"]["withdrawn"]["rows"]] == ["phone-1"]


def test_impact_counts_the_operator_overrides_in_force(
    capsys: pytest.CaptureFixture[str], config: Path
) -> None:
    """A suspended ban holds nobody and announces to nobody in the preview, as in the
    gateway; a break-glass exemption leaves out its one user."""
    path = inventory(config, "phone-1", "phone-2")
    code, out, _ = impact(capsys, config, "--json")
    assert [r["device_id"] for r in json.loads(out)["newly_held"]] == ["phone-1", "phone-2"]
    store = HoldStore(path)
    until = NOW + timedelta(hours=2)
    store.exempt_from_policy(
        "remove-tiktok", "user:phone-1@example.test", until, "travelling", "test", NOW
    )
    store.close()
    code, out, _ = impact(capsys, config, "--json")
    report = json.loads(out)
    assert [r["device_id"] for r in report["newly_held"]] == ["phone-2"]
    assert report["overrides"]["exempt"] == [
        {"policy_id": "remove-tiktok", "subject": "user:phone-1@example.test"}
    ]
    announced = "2020-07-10T12:00:00-07:00"
    code, out, _ = run(capsys, "impact", "--at", announced, "--config", str(config), "--json")
    assert [r["device_id"] for r in json.loads(out)["notices"]["announced"]["rows"]] == ["phone-2"]
    store = HoldStore(path)
    store.suspend_policy("remove-tiktok", until, "INC-1", "test", NOW)
    store.close()
    code, out, _ = impact(capsys, config)
    assert "newly held:      0 device(s), 0 user(s)" in out
    assert "overrides in force (counted): remove-tiktok suspended" in out
    code, out, _ = run(capsys, "impact", "--at", announced, "--config", str(config), "--json")
    assert json.loads(out)["notices"]["announced"]["notices"] == 0
    # Once the suspension and the exemption end (a later --at), both count again.
    later = (until + timedelta(minutes=1)).isoformat()
    code, out, _ = run(capsys, "impact", "--at", later, "--config", str(config), "--json")
    assert code == 0
    assert len(json.loads(out)["newly_held"]) == 2


def test_impact_says_nobody_is_told_when_notices_are_off(
    capsys: pytest.CaptureFixture[str], config: Path
) -> None:
    config.write_text(config.read_text().replace("notices = true", "notices = false"))
    inventory(config, "phone-1")
    code, out, _ = run(
        capsys, "impact", "--at", "2020-07-10T12:00:00-07:00", "--config", str(config), "--json"
    )
    assert json.loads(out)["notices"]["enabled"] is False
    assert json.loads(out)["notices"]["announced"]["notices"] == 0
    code, out, _ = run(
        capsys, "impact", "--at", "2020-07-10T12:00:00-07:00", "--config", str(config)
    )
    assert code == 0
    assert "notices:         off ([gateway] notices = false): nobody is told" in out
