"""`gateway hold ...` against a real hold store, as an admin would run it."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.config.settings import load_settings
from gateway.domain import (
    Action,
    Decision,
    Device,
    DeviceClaims,
    DeviceClass,
    HeldSubmission,
    Phase,
    Platform,
    PolicyMatch,
)
from gateway.hold.store import HoldStore

REPO = Path(__file__).resolve().parent.parent
NOW = datetime(2020, 7, 11, 10, 0, tzinfo=UTC)
HOSTILE = "phone-\x1b[2J\x1b[31m\r\nFAKE\x07\x9b1m\u2028"


@pytest.fixture
def config(tmp_path: Path) -> Path:
    shutil.copytree(REPO / "config", tmp_path / "config")
    return tmp_path / "config" / "gateway.toml"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def held(device_id: str = "phone-1", model: str | None = None) -> HeldSubmission:
    claims = DeviceClaims(
        issuer="https://mdm.example.test",
        subject="alice@example.test",
        audience=("gw",),
        issued_at=NOW,
        expires_at=NOW + timedelta(hours=1),
        device=Device(device_id, Platform.IOS, DeviceClass.MOBILE, model=model),
    )
    decision = Decision(
        Action.HOLD,
        Phase.ENFORCE,
        "Remove TikTok.",
        "v1",
        (PolicyMatch("remove-tiktok", Action.HOLD, Phase.ENFORCE, "Remove TikTok."),),
    )
    return HeldSubmission(
        "alice@example.test",
        ("bob@example.test",),
        b"Subject: held \x1b]0;owned\x07\r\nFrom: alice@example.test\r\n\r\nbody\r\n",
        claims,
        decision,
        NOW,
    )


def store_with(config: Path, *messages: HeldSubmission) -> list[str]:
    store = HoldStore(load_settings(config).hold.database)
    try:
        return [store.hold(message) for message in messages]
    finally:
        store.close()


def test_hold_show_prints_the_message(capsys: pytest.CaptureFixture[str], config: Path) -> None:
    (hold_id,) = store_with(config, held())
    code, out, err = run(capsys, "hold", "show", hold_id, "--config", str(config))
    assert code == 0, err
    assert f"hold_id:           {hold_id}" in out
    assert "device_id:         phone-1" in out
    assert "From: alice@example.test" in out
    code, out, _ = run(capsys, "hold", "show", hold_id, "--json", "--config", str(config))
    report = json.loads(out)
    assert code == 0
    assert report["schema"] == 1
    assert report["message"]["hold_id"] == hold_id
    assert report["message"]["claims"]["device_id"] == "phone-1"


def test_hold_show_unknown_id_is_one_clear_line_and_exit_1(
    capsys: pytest.CaptureFixture[str], config: Path
) -> None:
    store_with(config, held())
    code, out, err = run(capsys, "hold", "show", "no-such-id", "--config", str(config))
    assert code == 1
    assert out == ""
    assert err == "gateway: no held message 'no-such-id' (gateway hold list shows the ids)\n"


def test_hold_list_and_show_never_print_raw_control_characters(
    capsys: pytest.CaptureFixture[str], config: Path
) -> None:
    """A store written before tokens were checked for control characters (or by hand)
    must not drive the admin's terminal."""
    (hold_id,) = store_with(config, held(device_id=HOSTILE, model="\x1b[8m"))
    for argv in (("hold", "list"), ("hold", "show", hold_id)):
        code, out, err = run(capsys, *argv, "--config", str(config))
        assert code == 0, err
        printed = out + err
        for control in ("\x1b", "\x07", "\x9b", "\u2028", "\r"):
            assert control not in printed, (argv, control)
        assert "phone-\\x1b[2J" in out


def test_hold_release_and_drop_json(capsys: pytest.CaptureFixture[str], config: Path) -> None:
    first, _second = store_with(config, held("phone-1"), held("phone-2"))
    code, out, err = run(capsys, "hold", "release", first, "--json", "--config", str(config))
    assert code == 0, err
    assert json.loads(out) == {"schema": 1, "action": "release", "count": 1}
    code, out, err = run(capsys, "hold", "drop", "--all", "--json", "--config", str(config))
    assert code == 0, err
    assert json.loads(out) == {"schema": 1, "action": "drop", "count": 2}
    code, out, _ = run(capsys, "hold", "list", "--json", "--config", str(config))
    assert json.loads(out) == {"schema": 1, "messages": []}
