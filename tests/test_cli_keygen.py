"""`gateway token keygen` never replaces a key pair unless told to."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.cli import main


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def kid(directory: Path) -> str:
    return str(json.loads((directory / "dev-issuer.jwks.json").read_text())["keys"][0]["kid"])


def test_keygen_refuses_to_overwrite_without_force(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    keys = tmp_path / "keys"
    assert run(capsys, "token", "keygen", "--out", str(keys), "--kid", "first")[0] == 0
    private = (keys / "dev-issuer.private.jwk.json").read_bytes()
    code, out, err = run(capsys, "token", "keygen", "--out", str(keys), "--kid", "second")
    assert code == 1
    assert out == ""
    assert "already exist" in err
    assert "--force" in err
    assert kid(keys) == "first"
    assert (keys / "dev-issuer.private.jwk.json").read_bytes() == private
    code, _, _ = run(capsys, "token", "keygen", "--out", str(keys), "--kid", "second", "--force")
    assert code == 0
    assert kid(keys) == "second"


def test_keygen_refuses_when_only_the_public_half_exists(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (tmp_path / "dev-issuer.jwks.json").write_text('{"keys": []}')
    code, _, err = run(capsys, "token", "keygen", "--out", str(tmp_path))
    assert code == 1
    assert "dev-issuer.jwks.json" in err
    assert (tmp_path / "dev-issuer.jwks.json").read_text() == '{"keys": []}'
