"""`gateway config`: the effective configuration, defaults included, secrets never shown."""

from __future__ import annotations

import json
import shutil
import tomllib
from pathlib import Path

import pytest

from gateway.cli import main

REPO = Path(__file__).resolve().parent.parent
RELAY_PASSWORD = "s3cr3t-relay-password"


@pytest.fixture
def config(tmp_path: Path) -> Path:
    shutil.copytree(REPO / "config", tmp_path / "config")
    path = tmp_path / "config" / "gateway.toml"
    (path.parent / "relay.secret").write_text(RELAY_PASSWORD + "\n")
    path.write_text(
        path.read_text().replace(
            'tls = "none"                              # "none"',
            'tls = "starttls"\nusername = "relay-user"\npassword_file = "relay.secret"\n# "none"',
        )
    )
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_config_shows_every_key_with_defaults(
    capsys: pytest.CaptureFixture[str], config: Path
) -> None:
    code, out, err = run(capsys, "config", "--config", str(config))
    assert code == 0, err
    assert out.startswith(f"# effective configuration of {config}\n")
    parsed = tomllib.loads(out.replace(' = "<masked>"', ' = "masked"'))  # TOML as printed
    assert parsed["smtp"]["max_recipients"] == 100  # set in the file
    assert parsed["smtp"]["greeting_delay"] == 0  # set, equal to the default
    assert parsed["tokens"]["cache_entries"] == 10000  # not in the file: the default
    assert parsed["upstream"]["smarthosts"][0]["username"] == "relay-user"
    assert "# implicit_tls_listen not set: no such listener" in out
    assert RELAY_PASSWORD not in out
    assert 'password_file = "<masked>"  # secret, not shown' in out


def test_config_n_shows_only_what_differs_from_the_defaults(
    capsys: pytest.CaptureFixture[str], config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GATEWAY_SMTP__MAX_RECIPIENTS", "7")
    code, out, _ = run(capsys, "config", "-n", "--config", str(config))
    assert code == 0
    assert "max_recipients = 7\n" in out  # from the environment, as the gateway would use it
    assert "cache_entries" not in out
    assert "greeting_delay" not in out
    assert "not set" not in out
    assert 'password_file = "<masked>"' in out
    assert RELAY_PASSWORD not in out


def test_config_json(capsys: pytest.CaptureFixture[str], config: Path) -> None:
    code, out, _ = run(capsys, "config", "--json", "--config", str(config))
    report = json.loads(out)
    assert code == 0
    assert report["schema"] == 1
    assert report["config"] == str(config)
    settings = {(s["section"], s["index"], s["key"]): s for s in report["settings"]}
    assert settings["smtp", None, "max_recipients"] == {
        "section": "smtp",
        "index": None,
        "key": "max_recipients",
        "value": 100,
        "default": True,
        "masked": False,
    }
    assert settings["upstream.smarthosts", 0, "password_file"]["masked"] is True
    assert settings["upstream.smarthosts", 0, "password_file"]["value"] is None
    assert settings["limits", None, "command_call_limit"]["value"] == 1000
    assert RELAY_PASSWORD not in out
    code, out, _ = run(capsys, "config", "--json", "-n", "--config", str(config))
    changed = {(s["section"], s["key"]) for s in json.loads(out)["settings"]}
    assert ("upstream.smarthosts", "password_file") in changed
    assert ("smtp", "max_recipients") not in changed


def test_config_missing_file_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, _, err = run(capsys, "config", "--config", str(tmp_path / "nope.toml"))
    assert code == 2
    assert "does not exist" in err
