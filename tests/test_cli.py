"""The command line, driven as an admin would, against a copy of the shipped config/."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.cli import main

REPO = Path(__file__).resolve().parent.parent
ANNOUNCED = "2020-07-10T12:00:00-07:00"  # between announce_at and enforce_at
ENFORCED = "2020-07-11T10:00:00Z"  # after enforce_at
TIKTOK = "com.zhiliaoapp.musically"


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """A private copy of config/ so tests can edit policies."""
    shutil.copytree(REPO / "config", tmp_path / "config")
    return tmp_path / "config" / "gateway.toml"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def mint(
    capsys: pytest.CaptureFixture[str], config: Path, tmp_path: Path, *flags: str, at: str
) -> Path:
    code, out, err = run(capsys, "token", "mint", "--config", str(config), "--at", at, *flags)
    assert code == 0, err
    path = tmp_path / "token.jwt"
    path.write_text(out)
    return path


def explain(capsys: pytest.CaptureFixture[str], config: Path, token: Path, at: str) -> dict:  # type: ignore[type-arg]
    code, out, err = run(
        capsys, "explain", "--config", str(config), "--token", str(token), "--at", at, "--json"
    )
    assert code == 0, err
    return json.loads(out)  # type: ignore[no-any-return]


def set_state(config: Path, state: str) -> None:
    policy = config.parent / "policies" / "remove-tiktok.toml"
    policy.write_text(policy.read_text().replace('state = "enforce"', f'state = "{state}"'))


def test_check_shipped_policies(capsys: pytest.CaptureFixture[str], config: Path) -> None:
    code, out, _ = run(capsys, "check", "--config", str(config))
    assert code == 0
    assert "OK, 1 policies in 1 file(s) (1 enforce)" in out


def test_check_misspelt_key_exits_1_naming_file_line_key(
    capsys: pytest.CaptureFixture[str], config: Path
) -> None:
    policy = config.parent / "policies" / "remove-tiktok.toml"
    policy.write_text(policy.read_text().replace("scope.device_class", "scope.device_clas"))
    code, out, err = run(capsys, "check", str(config.parent / "policies"), "--config", str(config))
    assert code == 1
    assert (
        f"{policy}:8: policy[0].scope.device_clas: unknown key (did you mean 'device_class'?)"
        in out
    )
    assert "1 problem(s)" in err


def test_check_json(capsys: pytest.CaptureFixture[str], config: Path) -> None:
    code, out, _ = run(capsys, "check", "--json", "--config", str(config))
    report = json.loads(out)
    assert code == 0
    assert report["ok"] is True
    assert report["policies"] == 1


@pytest.mark.parametrize(
    ("flags", "at", "state", "action", "audit"),
    [
        (["--app", TIKTOK], ANNOUNCED, "enforce", "warn", []),
        (["--app", TIKTOK], ENFORCED, "enforce", "hold", []),
        (
            ["--app", TIKTOK, "--class", "desktop", "--platform", "macos"],
            ENFORCED,
            "enforce",
            "allow",
            [],
        ),
        (
            ["--app", TIKTOK, "--class", "browser", "--platform", "windows"],
            ENFORCED,
            "enforce",
            "allow",
            [],
        ),
        (["--app", "com.apple.mobilesafari"], ENFORCED, "enforce", "allow", []),
        (["--app", TIKTOK], ENFORCED, "retracted", "allow", []),
        (["--app", TIKTOK], ENFORCED, "audit", "allow", ["hold"]),
    ],
)
def test_explain_json_for_the_story(
    capsys: pytest.CaptureFixture[str],
    config: Path,
    tmp_path: Path,
    flags: list[str],
    at: str,
    state: str,
    action: str,
    audit: list[str],
) -> None:
    set_state(config, state)
    token = mint(
        capsys,
        config,
        tmp_path,
        "--sub",
        "alice@example.test",
        "--device-id",
        "phone-1",
        *flags,
        at=at,
    )
    report = explain(capsys, config, token, at)
    assert report["token"]["valid"] is True
    assert report["decision"]["action"] == action
    assert [m["action"] for m in report["decision"]["audit"]] == audit
    if action != "allow":
        assert report["decision"]["policy_ids"] == ["remove-tiktok"]
        assert "Remove TikTok" in report["decision"]["message"]


def test_explain_exempt_group(
    capsys: pytest.CaptureFixture[str], config: Path, tmp_path: Path
) -> None:
    token = mint(
        capsys,
        config,
        tmp_path,
        "--sub",
        "it@example.test",
        "--device-id",
        "lab",
        "--app",
        TIKTOK,
        at=ENFORCED,
    )
    report = explain(capsys, config, token, ENFORCED)
    assert report["decision"]["action"] == "allow"
    assert report["decision"]["exempted"] == ["remove-tiktok"]


def test_explain_human_output(
    capsys: pytest.CaptureFixture[str], config: Path, tmp_path: Path
) -> None:
    token = mint(
        capsys,
        config,
        tmp_path,
        "--sub",
        "alice@example.test",
        "--device-id",
        "p",
        "--app",
        TIKTOK,
        at=ENFORCED,
    )
    code, out, _ = run(
        capsys, "explain", "--config", str(config), "--token", str(token), "--at", ENFORCED
    )
    assert code == 0
    assert "decision:  HOLD (enforce phase): Remove TikTok" in out
    assert "remove-tiktok.toml:4" in out


def test_explain_refused_token_exits_1(
    capsys: pytest.CaptureFixture[str], config: Path, tmp_path: Path
) -> None:
    token = mint(
        capsys,
        config,
        tmp_path,
        "--sub",
        "alice@example.test",
        "--device-id",
        "p",
        at="2020-07-01T00:00:00Z",
    )
    code, out, _ = run(
        capsys,
        "explain",
        "--config",
        str(config),
        "--token",
        str(token),
        "--at",
        ENFORCED,
        "--json",
    )
    assert code == 1
    assert json.loads(out)["token"] == {
        "valid": False,
        "reason": "expired",
        "error": "token expired at 2020-07-01T00:15:00Z",
    }


def test_bad_config_is_one_clear_line(capsys: pytest.CaptureFixture[str], config: Path) -> None:
    config.write_text(config.read_text().replace("leeway_seconds = 60", "leeway_secs = 60"))
    code, _, err = run(capsys, "check", "--config", str(config))
    assert code == 2
    assert err.strip().endswith("tokens.leeway_secs: unknown key (did you mean 'leeway_seconds'?)")
    assert "Traceback" not in err


def test_bad_time_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], config: Path, tmp_path: Path
) -> None:
    code, _, err = run(
        capsys, "explain", "--config", str(config), "--token", "-", "--at", "2020-07-11T10:00:00"
    )
    assert code == 2
    assert "has no UTC offset" in err


def test_keygen_writes_a_usable_pair(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, _ = run(capsys, "token", "keygen", "--out", str(tmp_path / "keys"), "--kid", "k7")
    assert code == 0
    assert "NOT FOR PRODUCTION" in out
    private = tmp_path / "keys" / "dev-issuer.private.jwk.json"
    assert private.stat().st_mode & 0o777 == 0o600
    assert (
        json.loads((tmp_path / "keys" / "dev-issuer.jwks.json").read_text())["keys"][0]["kid"]
        == "k7"
    )


def test_console_script_runs(config: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "check", "--config", str(config)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout


def test_demo_story_policy_is_the_shipped_one() -> None:
    """`gateway demo` plays the ban shipped in config/: they must not drift apart."""
    from gateway.demo import story_policy

    assert story_policy() == (REPO / "config" / "policies" / "remove-tiktok.toml").read_text()


@pytest.mark.slow
def test_demo_command_plays_the_story() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "demo"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Every step behaved as the story says." in result.stdout
    assert "retracted ['remove-tiktok']" in result.stdout


# --- scope.access: policies that gate sending or syncing only --------------------------

SYNC_BAN = """
[[policy]]
id = "no-sync-with-tiktok"
match.apps_any = ["com.zhiliaoapp.musically"]
scope.access = ["sync"]
action = "reject"
message = "No mail sync on a phone with TikTok."
"""


def add_sync_ban(config: Path) -> None:
    (config.parent / "policies" / "no-sync.toml").write_text(SYNC_BAN)


def test_check_reports_access_only_when_a_policy_narrows_it(
    capsys: pytest.CaptureFixture[str], config: Path
) -> None:
    code, out, _ = run(capsys, "check", "--config", str(config))
    assert code == 0
    assert "access:" not in out
    add_sync_ban(config)
    code, out, _ = run(capsys, "check", "--config", str(config))
    assert code == 0
    assert "OK, 2 policies in 2 file(s)" in out
    assert "access: 1 sync only (no-sync-with-tiktok); the others gate sending and syncing" in out
    code, out, _ = run(capsys, "check", "--json", "--config", str(config))
    assert json.loads(out)["access_only"] == {"send": [], "sync": ["no-sync-with-tiktok"]}


def test_check_bad_access_names_file_line_and_key(
    capsys: pytest.CaptureFixture[str], config: Path
) -> None:
    add_sync_ban(config)
    policy = config.parent / "policies" / "no-sync.toml"
    policy.write_text(SYNC_BAN.replace('["sync"]', '["imap"]'))
    code, out, _ = run(capsys, "check", "--config", str(config))
    assert code == 1
    assert f"{policy}:5: policy[0].scope.access: 'imap' is not one of: send, sync" in out


def test_explain_decides_for_the_access_asked(
    capsys: pytest.CaptureFixture[str], config: Path, tmp_path: Path
) -> None:
    add_sync_ban(config)
    token = mint(capsys, config, tmp_path, "--sub", "alice@example.test", "--device-id",
                 "phone-1", "--app", TIKTOK, at=ENFORCED)  # fmt: skip
    send = explain(capsys, config, token, ENFORCED)  # --access defaults to send
    assert send["access"] == "send"
    assert send["decision"]["action"] == "hold"
    assert send["decision"]["policy_ids"] == ["remove-tiktok"]
    assert send["other_access_only"] == ["no-sync-with-tiktok"]
    code, out, err = run(capsys, "explain", "--config", str(config), "--token", str(token),
                         "--at", ENFORCED, "--access", "sync", "--json")  # fmt: skip
    assert code == 0, err
    sync = json.loads(out)
    assert sync["access"] == "sync"
    assert sync["decision"]["action"] == "reject"
    assert [m["policy_id"] for m in sync["decision"]["matches"]] == [
        "no-sync-with-tiktok",
        "remove-tiktok",
    ]
    assert sync["other_access_only"] == []


def test_explain_access_over_the_real_command_line(
    capsys: pytest.CaptureFixture[str], config: Path, tmp_path: Path
) -> None:
    add_sync_ban(config)
    token = mint(capsys, config, tmp_path, "--sub", "alice@example.test", "--device-id",
                 "phone-1", "--app", TIKTOK, at=ENFORCED)  # fmt: skip

    def explain_cli(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "gateway", "explain", "--config", str(config),
             "--token", str(token), "--at", ENFORCED, *extra],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip

    sync = explain_cli("--access", "sync")
    assert sync.returncode == 0, sync.stderr
    assert "access:    sync (an IMAP or POP3 login" in sync.stdout
    assert "decision:  REJECT (enforce phase): No mail sync on a phone with TikTok." in sync.stdout
    send = explain_cli()
    assert send.returncode == 0, send.stderr
    assert "access:    send (SMTP submission" in send.stdout
    assert "decision:  HOLD (enforce phase)" in send.stdout
    assert "sync only            no-sync-with-tiktok      reject  enforce" in send.stdout
    assert "no-sync.toml:2" in send.stdout
    bad = explain_cli("--access", "imap")
    assert bad.returncode == 2
    assert "argument --access: invalid choice: 'imap' (choose from 'send', 'sync')" in bad.stderr


def test_explain_shows_the_devices_own_grace_deadline_and_rollout_stage(
    capsys: pytest.CaptureFixture[str], config: Path, tmp_path: Path
) -> None:
    """grace_hours counts from when this device was first seen matching (read from the hold
    database); a device outside the rollout's stage is told so."""
    from datetime import UTC, datetime

    from gateway.hold.store import HoldStore

    policy = config.parent / "policies" / "remove-tiktok.toml"
    policy.write_text(
        policy.read_text().replace('state = "enforce"', 'state = "enforce"\ngrace_hours = 72')
    )
    seen = datetime(2020, 7, 11, 9, 0, tzinfo=UTC)  # after the deadline: its own grace
    store = HoldStore(config.parent.parent / "var" / "hold.db")
    assert store.first_seen("late-phone", "remove-tiktok", seen) == seen
    assert store.first_seen("late-phone", "remove-tiktok", datetime.now(UTC)) == seen  # kept
    store.close()
    token = mint(
        capsys,
        config,
        tmp_path,
        "--sub",
        "alice@example.test",
        "--device-id",
        "late-phone",
        "--app",
        TIKTOK,
        at=ENFORCED,
    )
    code, out, _ = run(
        capsys, "explain", "--config", str(config), "--token", str(token), "--at", ENFORCED
    )
    assert code == 0
    assert "decision:  WARN (announce phase)" in out
    assert (
        "remove-tiktok: this device's deadline: 2020-07-14T09:00:00+00:00 "
        "(first seen matching 2020-07-11T09:00:00+00:00, grace 3 days, 0:00:00)" in out
    )
    later = "2020-07-14T09:00:00Z"
    again = mint(
        capsys, config, tmp_path, "--sub", "alice@example.test", "--device-id", "late-phone",
        "--app", TIKTOK, at=later,
    )  # fmt: skip
    report = explain(capsys, config, again, later)
    assert report["decision"]["action"] == "hold"
    assert report["first_seen"] == {"remove-tiktok": "2020-07-11T09:00:00+00:00"}

    policy.write_text(policy.read_text().replace("grace_hours = 72", "rollout.percent = 0"))
    code, out, _ = run(
        capsys, "explain", "--config", str(config), "--token", str(again), "--at", later
    )
    assert (
        "remove-tiktok: this device is outside the rollout (current stage: 0% from the start)"
        in out
    )
    report = explain(capsys, config, again, later)
    assert report["decision"]["matches"][0]["outside_rollout"] is True
