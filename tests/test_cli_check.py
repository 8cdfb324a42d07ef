"""`gateway check`: what it ignores is said out loud, and one file can be checked alone."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from gateway.cli import main

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def config(tmp_path: Path) -> Path:
    shutil.copytree(REPO / "config", tmp_path / "config")
    return tmp_path / "config" / "gateway.toml"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_a_misnamed_policy_file_is_a_warning_not_a_silent_ok(
    capsys: pytest.CaptureFixture[str], config: Path
) -> None:
    policies = config.parent / "policies"
    (policies / "remove-tiktok.toml").rename(policies / "ban.tml")
    code, out, err = run(capsys, "check", "--config", str(config))
    assert code == 0
    assert f"warning: {policies / 'ban.tml'}: ignored: not a .toml file" in err
    assert "no policies: deployed, this set would end every policy in force" in err
    assert "OK, 0 policies" in out


def test_ignored_files_are_listed_in_json(capsys: pytest.CaptureFixture[str], config: Path) -> None:
    policies = config.parent / "policies"
    (policies / "ban.tml").write_text("")
    (policies / ".remove-tiktok.toml.swp").write_text("")
    (policies / "old").mkdir()
    code, out, _ = run(capsys, "check", "--json", "--config", str(config))
    report = json.loads(out)
    assert code == 0
    assert report["schema"] == 1
    assert report["policies"] == 1
    assert report["warnings"] == [
        {
            "file": str(policies / ".remove-tiktok.toml.swp"),
            "message": "ignored: hidden (its name starts with a dot)",
        },
        {"file": str(policies / "ban.tml"), "message": "ignored: not a .toml file"},
        {
            "file": str(policies / "old"),
            "message": "ignored: not a regular file (subdirectories are not read)",
        },
    ]


def test_check_one_file(capsys: pytest.CaptureFixture[str], config: Path, tmp_path: Path) -> None:
    policy = config.parent / "policies" / "remove-tiktok.toml"
    code, out, err = run(capsys, "check", str(policy), "--config", str(config))
    assert code == 0, err
    assert out == f"{policy}: OK, 1 policies in 1 file(s) (1 enforce)\n"
    draft = tmp_path / "new-ban.toml"  # outside any policy directory, not yet deployed
    draft.write_text(policy.read_text().replace("scope.device_class", "scope.device_clas"))
    code, out, err = run(capsys, "check", str(draft), "--config", str(config))
    assert code == 1
    assert f"{draft}:8: policy[0].scope.device_clas: unknown key" in out
    assert f"1 problem(s) in {draft}" in err


def test_check_one_file_the_gateway_would_ignore(
    capsys: pytest.CaptureFixture[str], config: Path
) -> None:
    policy = config.parent / "policies" / "remove-tiktok.toml"
    typo = policy.rename(policy.with_name("remove-tiktok.tml"))
    code, _, err = run(capsys, "check", str(typo), "--config", str(config))
    assert code == 0
    assert "the gateway ignores this file in a policy directory" in err


def test_check_a_path_that_does_not_exist(
    capsys: pytest.CaptureFixture[str], config: Path, tmp_path: Path
) -> None:
    code, out, _ = run(capsys, "check", str(tmp_path / "nope"), "--config", str(config))
    assert code == 1
    assert "policy directory does not exist" in out
