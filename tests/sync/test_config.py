"""The [sync] section: off by default, on loopback; off loopback only with credentials;
secrets from files, never in repr or logs."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config.settings import Endpoint, Settings, load_settings
from gateway.errors import SettingsError
from gateway.testing.issuer import TestIssuer

BASE = """
[tokens]
audience = "gw.example.com"

[[tokens.issuers]]
issuer = "https://mdm.example.com"
keys = ["mdm.jwks.json"]

[[upstream.smarthosts]]
host = "relay.example.com"
"""


def load(directory: Path, sync: str) -> Settings:
    TestIssuer.generate("k1").write_jwks(directory / "mdm.jwks.json")
    (directory / "secret").write_text("s3cret-value\n")
    (directory / "empty").write_text("\n")
    (directory / "gateway.toml").write_text(BASE + "\n[sync]\n" + sync)
    return load_settings(directory / "gateway.toml", {})


def problems(directory: Path, sync: str) -> str:
    with pytest.raises(SettingsError) as caught:
        load(directory, sync)
    return str(caught.value)


def test_off_by_default_and_on_loopback(tmp_path: Path) -> None:
    settings = load(tmp_path, "")
    assert not settings.sync.enabled
    assert settings.sync.listen == Endpoint("127.0.0.1", 9588)
    assert settings.sync.on_loopback
    assert settings.sync.hold == "quarantine"
    # On loopback, no credentials are needed.
    assert load(tmp_path, "enabled = true\n").sync.enabled


def test_a_listener_off_loopback_without_credentials_is_refused(tmp_path: Path) -> None:
    text = problems(tmp_path, 'enabled = true\nlisten = "0.0.0.0:9588"\n')
    assert "gateway.toml:" in text
    assert "sync.listen" in text
    assert "reachable from other hosts" in text
    assert "client_secret_file" in text
    assert "nginx_secret_file" in text
    # with credentials it loads
    for credentials in (
        'client_id = "dovecot"\nclient_secret_file = "secret"\n',
        'nginx_secret_file = "secret"\n',
    ):
        settings = load(tmp_path, f'enabled = true\nlisten = "0.0.0.0:9588"\n{credentials}')
        assert not settings.sync.on_loopback


def test_credentials_and_backend_are_checked(tmp_path: Path) -> None:
    assert "go together" in problems(tmp_path, 'client_id = "dovecot"\n')
    assert "the file is empty" in problems(
        tmp_path, 'client_id = "dovecot"\nclient_secret_file = "empty"\n'
    )
    assert "is not an IP address" in problems(
        tmp_path, 'imap_backend = "imap.example.com:143"\nbackend_password_file = "secret"\n'
    )
    assert "needs backend_password_file" in problems(tmp_path, 'imap_backend = "10.0.0.1:143"\n')
    assert "does not exist" in problems(tmp_path, 'nginx_secret_file = "missing"\n')


def test_secrets_are_not_in_the_settings_repr(tmp_path: Path) -> None:
    settings = load(
        tmp_path,
        'client_id = "dovecot"\nclient_secret_file = "secret"\nnginx_secret_file = "secret"\n'
        'imap_backend = "10.0.0.1:143"\nbackend_password_file = "secret"\n',
    )
    assert settings.sync.client_secret == "s3cret-value"
    assert "s3cret" not in repr(settings)


def test_the_doveadm_api_needs_its_key_and_an_http_url(tmp_path: Path) -> None:
    url = 'doveadm_url = "http://127.0.0.1:8080/doveadm/v1"\n'
    assert "doveadm_url needs doveadm_api_key_file" in problems(tmp_path, url)
    assert "is not an http(s) URL" in problems(
        tmp_path, 'doveadm_url = "127.0.0.1:8080"\ndoveadm_api_key_file = "secret"\n'
    )
    assert "the file is empty" in problems(tmp_path, url + 'doveadm_api_key_file = "empty"\n')
    settings = load(tmp_path, url + 'doveadm_api_key_file = "secret"\nlmtp = "127.0.0.1:24"\n')
    assert settings.sync.doveadm_api_key == "s3cret-value"
    assert settings.sync.lmtp == Endpoint("127.0.0.1", 24)
    assert "s3cret" not in repr(settings)
