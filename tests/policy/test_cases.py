"""`gateway test`: policy test cases for admins, run through the real CLI on real files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from xml.etree import ElementTree

import pytest

from gateway.cli import main

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def story(tmp_path: Path) -> Path:
    """A private copy of config/ (policies, cases, gateway.toml)."""
    shutil.copytree(REPO / "config", tmp_path / "config")
    return tmp_path / "config"


def run(capsys: pytest.CaptureFixture[str], config: Path, *extra: str) -> tuple[int, str, str]:
    code = main(
        [
            "test", str(config / "policies"), str(config / "policy-tests" / "story.toml"),
            "--config", str(config / "gateway.toml"), *extra,
        ]
    )  # fmt: skip
    out, err = capsys.readouterr()
    return code, out, err


def test_the_shipped_story_cases_pass(capsys: pytest.CaptureFixture[str], story: Path) -> None:
    code, out, _ = run(capsys, story)
    assert code == 0
    assert out.count("\nok   ") + out.startswith("ok   ") == 8
    assert out.endswith("8 passed, 0 failed\n")


def test_a_changed_case_fails_with_a_readable_diff_and_junit(
    capsys: pytest.CaptureFixture[str], story: Path, tmp_path: Path
) -> None:
    cases = story / "policy-tests" / "story.toml"
    text = cases.read_text()
    held = 'name = "after the deadline the phone\'s mail is held"\napps = ["com.zhiliaoapp.musically"]\nexpect = "hold"'
    assert held in text
    cases.write_text(text.replace(held, held.replace('expect = "hold"', 'expect = "warn"')))
    junit = tmp_path / "results.xml"
    code, out, _ = run(capsys, story, "--junit", str(junit))
    assert code == 1
    assert "FAIL after the deadline the phone's mail is held  (" in out
    assert "       expected warn, got hold by remove-tiktok (enforce)\n" in out
    assert "       expected phase enforce" not in out  # the phase did match
    assert out.endswith("7 passed, 1 failed\n")
    suite = ElementTree.fromstring(junit.read_bytes())  # noqa: S314  # our own output
    assert suite.get("tests") == "8"
    assert suite.get("failures") == "1"
    failed = [c for c in suite.iter("testcase") if c.find("failure") is not None]
    assert [c.get("name") for c in failed] == ["after the deadline the phone's mail is held"]


def test_json_output(capsys: pytest.CaptureFixture[str], story: Path) -> None:
    code, out, _ = run(capsys, story, "--json")
    report = json.loads(out)
    assert code == 0
    assert report["schema"] == 1
    assert report["ok"] is True
    exempt = next(c for c in report["cases"] if c["name"] == "IT's test phone is exempt")
    assert exempt["decision"]["action"] == "allow"
    assert exempt["decision"]["exempted"] == ["remove-tiktok"]


def test_a_bad_cases_file_names_file_line_and_key(
    capsys: pytest.CaptureFixture[str], story: Path
) -> None:
    cases = story / "policy-tests" / "story.toml"
    cases.write_text(
        '[[case]]\nname = "typo"\nuser = "a@example.test"\nclass = "mobile"\n'
        'at = 2020-07-11T12:00:00Z\nexpct = "hold"\n'
    )
    code, _, err = run(capsys, story)
    assert code == 2
    assert f"{cases}:6: case[0].expct: unknown key (did you mean 'expect'?)" in err
    assert "missing required key 'expect'" in err


def test_case_names_cannot_write_control_characters_to_the_terminal(
    capsys: pytest.CaptureFixture[str], story: Path
) -> None:
    cases = story / "policy-tests" / "story.toml"
    cases.write_text(
        '[[case]]\nname = "evil\\u001b[2J\\r"\nuser = "a@example.test"\nclass = "mobile"\n'
        'at = 2020-07-11T12:00:00Z\nexpect = "reject"\n'
    )
    code, out, _ = run(capsys, story)
    assert code == 1
    assert "\x1b" not in out
    assert "\r" not in out
    assert "evil\\x1b[2J\\r" in out


def test_a_case_may_decide_for_sync(capsys: pytest.CaptureFixture[str], story: Path) -> None:
    (story / "policies" / "no-sync.toml").write_text(
        '[[policy]]\nid = "no-sync-with-tiktok"\nmatch.apps_any = ["com.zhiliaoapp.musically"]\n'
        'scope.access = ["sync"]\naction = "reject"\n'
    )
    cases = story / "policy-tests" / "story.toml"
    cases.write_text(
        '[defaults]\nuser = "carol@example.test"\nclass = "mobile"\nat = 2020-07-11T12:00:00Z\n'
        'apps = ["com.zhiliaoapp.musically"]\n\n'
        '[[case]]\nname = "sending is held"\nexpect = "hold"\nexpect_policy = "remove-tiktok"\n\n'
        '[[case]]\nname = "syncing is refused"\naccess = "sync"\nexpect = "reject"\n'
        'expect_policy = "no-sync-with-tiktok"\n\n'
        '[[case]]\nname = "wrongly expects sync to be held"\naccess = "sync"\nexpect = "hold"\n'
    )
    code, out, _ = run(capsys, story, "--json")
    assert code == 1
    report = {c["name"]: c for c in json.loads(out)["cases"]}
    assert report["sending is held"]["access"] == "send"  # the default
    assert report["sending is held"]["passed"] is True
    assert report["syncing is refused"]["access"] == "sync"
    assert report["syncing is refused"]["passed"] is True
    assert report["wrongly expects sync to be held"]["differences"] == [
        "expected hold for sync, got reject by no-sync-with-tiktok (enforce)"
    ]
    # [defaults] may give the access too.
    cases.write_text(cases.read_text().replace("[defaults]\n", '[defaults]\naccess = "sync"\n', 1))
    code, out, _ = run(capsys, story)
    assert "FAIL sending is held" in out
    assert "expected hold for sync, got reject by no-sync-with-tiktok" in out


def test_a_bad_access_in_a_case_names_file_line_and_key(
    capsys: pytest.CaptureFixture[str], story: Path
) -> None:
    cases = story / "policy-tests" / "story.toml"
    cases.write_text(
        '[[case]]\nname = "x"\nuser = "a@example.test"\nclass = "mobile"\n'
        'at = 2020-07-11T12:00:00Z\naccess = "imap"\nexpect = "allow"\n'
    )
    code, _, err = run(capsys, story)
    assert code == 2
    assert f"{cases}:6: case[0].access: 'imap' is not one of: send, sync" in err


def test_cases_for_grace_and_staged_rollout(
    capsys: pytest.CaptureFixture[str], story: Path
) -> None:
    """A case may say when its device was first seen matching (grace_hours counts from it)
    and whether a staged rollout leaves it out; a wrong expectation is a readable diff."""
    policy = story / "policies" / "remove-tiktok.toml"
    policy.write_text(
        policy.read_text().replace(
            'state = "enforce"', 'state = "enforce"\ngrace_hours = 72\nrollout.percent = 50'
        )
    )
    cases = story / "policy-tests" / "story.toml"
    cases.write_text(
        """\
[defaults]
at = 2020-07-12T09:00:00Z
user = "alice@example.test"
class = "mobile"
apps = ["com.zhiliaoapp.musically"]
first_seen = 2020-07-01T00:00:00Z

[[case]]
name = "phone in the rollout, seen long ago: held"
device_id = "phone-2"
expect = "hold"
expect_outside_rollout = false

[[case]]
name = "phone outside the rollout: warned"
device_id = "phone-1"
expect = "warn"
expect_outside_rollout = true

[[case]]
name = "phone in the rollout first seen yesterday: still in its grace period"
device_id = "phone-2"
first_seen = 2020-07-11T09:00:00Z
expect = "warn"
expect_phase = "announce"

[[case]]
name = "a wrong expectation"
device_id = "phone-1"
expect = "warn"
expect_outside_rollout = false
"""
    )
    code, out, _ = run(capsys, story)
    assert code == 1
    assert out.endswith("3 passed, 1 failed\n"), out
    assert "       expected inside the rollout, got outside remove-tiktok\n" in out
