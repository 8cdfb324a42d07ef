"""The configuration reference is generated from the settings declarations, and those
declarations agree with what load_settings really accepts: every documented key loads
and arrives in the settings, every key the reader asks for is documented, and every
documented default is the dataclass default."""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import subprocess
import sys
from collections.abc import Iterable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from gateway.config.reference import (
    BEGIN,
    END,
    WRITE_COMMAND,
    current_block,
    default_toml,
    generate,
    key_cell,
)
from gateway.config.settings import (
    SECTIONS,
    SETTINGS_CLASSES,
    Endpoint,
    HoldSettings,
    Issuer,
    Key,
    LimitSettings,
    Settings,
    Smarthost,
    SmtpSettings,
    StoreSettings,
    SyncSettings,
    UpstreamSettings,
    VerifierSettings,
    documented_keys,
    load_settings,
)
from gateway.errors import SettingsError
from gateway.testing.issuer import TestIssuer

REPO = Path(__file__).resolve().parents[2]
DOCUMENT = REPO / "docs" / "configuration.md"
ISSUER = "https://mdm.example.com"
UNDOCUMENTED = "zz_not_a_setting"

# Fields that are not keys of their own: tables, or where the file was.
NOT_KEYS = {
    (Settings, "path"),
    (Settings, "tokens"),
    (Settings, "smtp"),
    (Settings, "upstream"),
    (Settings, "hold"),
    (Settings, "limits"),
    (Settings, "sync"),
    (Settings, "store"),
    (VerifierSettings, "issuers"),
    (UpstreamSettings, "smarthosts"),
}

# Every documented key: a line that sets it to a valid value other than its default, and
# the value the settings must then hold ("base" is the directory of gateway.toml).
NON_DEFAULT: dict[tuple[str, str], tuple[str, Any]] = {
    ("gateway", "policy_dir"): ('"rules"', Path("base/rules")),
    ("gateway", "workers"): ("2", 2),
    ("gateway", "reload_interval"): ("5", 5.0),
    ("gateway", "overrides_poll_seconds"): ("2.5", 2.5),
    ("gateway", "max_newly_blocked_devices"): ("0", 0),
    ("gateway", "inventory_retention_days"): ("7", timedelta(days=7)),
    ("gateway", "notices"): ("false", False),
    ("gateway", "announce_notices_per_second"): ("2.5", 2.5),
    ("gateway", "notice_sender"): ('"it@example.com"', "it@example.com"),
    ("tokens", "audience"): ('"gw.example.com"', "gw.example.com"),
    ("tokens", "leeway_seconds"): ("0", timedelta(0)),
    ("tokens", "max_token_bytes"): ("4096", 4096),
    ("tokens", "cache_entries"): ("50000", 50000),
    ("tokens.issuers", "issuer"): (f'"{ISSUER}"', ISSUER),
    ("tokens.issuers", "keys"): ('["mdm.jwks.json"]', ["k1"]),
    ("tokens.issuers", "jwks_url"): (
        '"https://mdm.example.com/jwks"',
        "https://mdm.example.com/jwks",
    ),
    ("tokens.issuers", "jwks_refresh_seconds"): ("60", timedelta(seconds=60)),
    ("tokens.issuers", "algorithms"): ('["ES256"]', frozenset({"ES256"})),
    ("tokens.issuers", "token_type"): ('"device+jwt"', "device+jwt"),
    ("smtp", "hostname"): ('"mail.example.com"', "mail.example.com"),
    ("smtp", "listen"): ('"[::1]:587"', Endpoint("::1", 587)),
    ("smtp", "implicit_tls_listen"): ('"[::]:465"', Endpoint("::", 465)),
    ("smtp", "tls_cert"): ('"cert.pem"', Path("base/cert.pem")),
    ("smtp", "tls_key"): ('"key.pem"', Path("base/key.pem")),
    ("smtp", "allow_plaintext_auth"): ("true", True),
    ("smtp", "max_message_size"): ("1024", 1024),
    ("smtp", "max_recipients"): ("1", 1),
    ("smtp", "max_auth_bytes"): ("4096", 4096),
    ("smtp", "idle_timeout"): ("1.5", 1.5),
    ("smtp", "data_timeout"): ("30", 30.0),
    ("smtp", "bare_linefeeds"): ('"normalize"', "normalize"),
    ("smtp", "greeting_delay"): ("0.5", 0.5),
    ("smtp", "proxy_protocol_from"): (
        '["10.0.0.0/24", "2001:db8::/32"]',
        (ipaddress.ip_network("10.0.0.0/24"), ipaddress.ip_network("2001:db8::/32")),
    ),
    ("smtp", "proxy_protocol_timeout"): ("2.5", 2.5),
    ("upstream", "mode"): ('"mx"', "mx"),
    ("upstream", "timeout"): ("5", 5.0),
    ("upstream", "pool_size"): ("1", 1),
    ("upstream", "mx_port"): ("2525", 2525),
    ("upstream", "nameservers"): (
        '["10.0.0.53", "[fd00::53]:5353"]',
        (Endpoint("10.0.0.53", 53), Endpoint("fd00::53", 5353)),
    ),
    ("upstream", "helo_name"): ('"gw.example.com"', "gw.example.com"),
    ("upstream.smarthosts", "host"): ('"relay.example.com"', "relay.example.com"),
    ("upstream.smarthosts", "port"): ("587", 587),
    ("upstream.smarthosts", "tls"): ('"tls"', "tls"),
    ("upstream.smarthosts", "verify"): ("false", False),
    ("upstream.smarthosts", "ca_file"): ('"ca.pem"', Path("base/ca.pem")),
    ("upstream.smarthosts", "username"): ('"gateway"', "gateway"),
    ("upstream.smarthosts", "password_file"): ('"password"', "s3cret"),
    ("hold", "database"): ('"hold.db"', Path("base/hold.db")),
    ("hold", "expire_after_hours"): ("1.5", timedelta(hours=1.5)),
    ("hold", "release_concurrency"): ("1", 1),
    ("hold", "busy_timeout_seconds"): ("0.5", 0.5),
    ("hold", "min_free_bytes"): ("0", 0),
    ("hold", "release_interval_seconds"): ("1", 1.0),
    ("hold", "retry_min_seconds"): ("1", 1.0),
    ("hold", "retry_max_seconds"): ("60", 60.0),
    ("limits", "max_connections"): ("5", 5),
    ("limits", "max_connections_per_ip"): ("2", 2),
    ("limits", "max_unauthenticated_connections"): ("3", 3),
    ("limits", "pre_auth_timeout_under_load_seconds"): ("5", 5.0),
    ("limits", "messages_per_user_per_minute"): ("3", 3),
    ("limits", "auth_failures_per_session"): ("4", 4),
    ("limits", "auth_failure_delay_seconds"): ("0.25", 0.25),
    ("limits", "auth_failure_delay_max_seconds"): ("2", 2.0),
    ("limits", "data_bytes_in_flight"): ("1048576", 1048576),
    ("limits", "max_errors"): ("2", 2),
    ("limits", "command_call_limit"): ('{ "*" = 50, noop = 5 }', {"*": 50, "NOOP": 5}),
    ("admin", "listen"): ('"127.0.0.1:9000"', Endpoint("127.0.0.1", 9000)),
    ("admin", "tokens_file"): ('"admin-tokens"', Path("base/admin-tokens")),
    ("sync", "enabled"): ("true", True),
    ("sync", "listen"): ('"[::1]:9589"', Endpoint("::1", 9589)),
    ("store", "url"): (
        '"postgresql://gw@db.example:5433/gateway"',
        "postgresql://gw@db.example:5433/gateway",
    ),
    ("store", "password_file"): ('"password"', "s3cret"),
    ("store", "pool_size"): ("3", 3),
    ("store", "connect_timeout_seconds"): ("2", 2.0),
    ("store", "claim_lease_seconds"): ("60", 60.0),
    ("sync", "client_id"): ('"dovecot"', "dovecot"),
    ("sync", "client_secret_file"): ('"password"', "s3cret"),
    ("sync", "nginx_secret_file"): ('"password"', "s3cret"),
    ("sync", "hold"): ('"refuse"', "refuse"),
    ("sync", "imap_backend"): ('"10.0.0.143:143"', Endpoint("10.0.0.143", 143)),
    ("sync", "backend_password_file"): ('"password"', "s3cret"),
    ("sync", "backend_master_user"): ('"gateway"', "gateway"),
    ("sync", "auth_wait_seconds"): ("0", 0),
    ("sync", "doveadm_url"): (
        '"http://127.0.0.1:8080/doveadm/v1"',
        "http://127.0.0.1:8080/doveadm/v1",
    ),
    ("sync", "doveadm_api_key_file"): ('"password"', "s3cret"),
    ("sync", "kick_attempts"): ("2", 2),
    ("sync", "lmtp"): ('"127.0.0.1:24"', Endpoint("127.0.0.1", 24)),
    ("sync", "timeout_seconds"): ("2.5", 2.5),
    # Free-form sections: the admin picks the key.
    ("groups", "<group name>"): (
        'it-staff = ["IT@example.com"]',
        {"it-staff": frozenset({"it@example.com"})},
    ),
    ("aliases", '"<user address>"'): (
        '"Alice@example.com" = ["A.Smith@example.com"]',
        {"alice@example.com": frozenset({"a.smith@example.com"})},
    ),
}


def _name(key: Key) -> str:
    return key_cell(key).strip("`")


def _line(key: Key, value: str) -> str:
    return value if key.section.free_form else f"{key.name} = {value}"


def render(sections: dict[str, list[str]], top: Iterable[str] = ()) -> str:
    """gateway.toml with these lines in each section (array sections: one table)."""
    out = [*top]
    for section in SECTIONS:
        lines = sections.get(section.name)
        if lines is not None:
            out += ["", f"[[{section.name}]]" if section.array else f"[{section.name}]", *lines]
    return "\n".join(out) + "\n"


def minimal() -> dict[str, list[str]]:
    """The required keys only (and the one smarthost that mode "smarthost" needs)."""
    return {
        "tokens": ['audience = "gw.example.com"'],
        "tokens.issuers": [f'issuer = "{ISSUER}"', 'keys = ["mdm.jwks.json"]'],
        "upstream": [],
        "upstream.smarthosts": ['host = "relay.example.com"'],
    }


@pytest.fixture
def base(tmp_path: Path) -> Path:
    TestIssuer.generate("k1").write_jwks(tmp_path / "mdm.jwks.json")
    for name in ("cert.pem", "key.pem", "ca.pem"):
        (tmp_path / name).write_text("not parsed when settings load\n")
    (tmp_path / "password").write_text("s3cret\n")
    return tmp_path


def load(base: Path, text: str) -> Settings:
    (base / "gateway.toml").write_text(text)
    return load_settings(base / "gateway.toml", {})


def value_of(settings: Settings, key: Key) -> Any:
    owner = {
        Settings: settings,
        VerifierSettings: settings.tokens,
        Issuer: settings.tokens.issuers[ISSUER],
        SmtpSettings: settings.smtp,
        UpstreamSettings: settings.upstream,
        Smarthost: settings.upstream.smarthosts[0],
        HoldSettings: settings.hold,
        LimitSettings: settings.limits,
        SyncSettings: settings.sync,
        StoreSettings: settings.store,
    }[key.owner]
    value = getattr(owner, key.field.name)
    return sorted(value) if key.owner is Issuer and key.field.name == "keys" else value


def resolved(value: Any, base: Path) -> Any:
    """Paths in gateway.toml (and in NON_DEFAULT, as base/...) are relative to its directory."""
    if isinstance(value, Path):
        return base / value.relative_to("base") if value.parts[0] == "base" else base / value
    return value


# --- (a) the document holds the generated reference ------------------------------------


def test_the_reference_in_the_docs_is_the_generated_one() -> None:
    assert current_block(DOCUMENT.read_text(encoding="utf-8")) == generate(), (
        f"docs/configuration.md's configuration reference differs from the settings "
        f"declarations in gateway/config/settings.py; run: {WRITE_COMMAND}"
    )


def test_check_fails_on_a_stale_document_and_write_repairs_it(tmp_path: Path) -> None:
    document = tmp_path / "configuration.md"
    document.write_text(f"# Hand-written\n\n{BEGIN}\n| old |\n{END}\n\nMore prose.\n")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "gateway.config.reference", *args, str(document)],
            capture_output=True,
            text=True,
            check=False,
            cwd=REPO,
        )

    stale = run("--check")
    assert stale.returncode == 1
    assert f"--write {document}" in stale.stderr
    assert run("--write").returncode == 0
    assert run("--check").returncode == 0
    text = document.read_text()
    assert text.startswith("# Hand-written\n\n")
    assert text.endswith("\n\nMore prose.\n")
    assert current_block(text) == generate()


def test_every_section_has_a_table_and_admin_is_there() -> None:
    block = generate()
    for section in SECTIONS:
        header = f"[[{section.name}]]" if section.array else f"[{section.name}]"
        assert f"### `{header}`" in block
    assert "| `listen` |" in block.split("### `[admin]`")[1].split("###")[0]


# --- (b) the documented keys are exactly the keys the reader accepts --------------------


def test_every_settings_field_is_a_documented_key_or_a_table() -> None:
    documented = {(k.owner, k.field.name) for k in documented_keys()}
    every = {(cls, f.name) for cls in SETTINGS_CLASSES for f in dataclasses.fields(cls)}
    assert every - documented == NOT_KEYS
    assert len(documented_keys()) == len(documented)  # each field documented once


def test_every_documented_key_loads_with_a_non_default_value(base: Path) -> None:
    keys = documented_keys()
    assert {(k.section.name, _name(k)) for k in keys} == set(NON_DEFAULT)
    sections: dict[str, list[str]] = {s.name: [] for s in SECTIONS}
    for key in keys:
        sections[key.section.name].append(_line(key, NON_DEFAULT[key.section.name, _name(key)][0]))
    settings = load(base, render(sections))
    for key in keys:
        expected = resolved(NON_DEFAULT[key.section.name, _name(key)][1], base)
        assert value_of(settings, key) == expected, f"[{key.section.name}] {key.name}"
        if not key.required:
            assert expected != resolved(key.default, base), f"[{key.section.name}] {key.name}"


def _allowed(problems: list[str], path: str) -> set[str]:
    """The keys the reader asked for in one table, from its 'unknown key' problem."""
    suffix = f"{path}.{UNDOCUMENTED}" if path else UNDOCUMENTED
    (found,) = [p for p in problems if f" {suffix}: unknown key" in p]
    listed = re.search(r"allowed here: (.*)\)$", found)
    assert listed, found
    return set(listed.group(1).split(", "))


def test_the_reader_asks_for_the_documented_keys_and_refuses_others(base: Path) -> None:
    sections = minimal()
    for section in SECTIONS:
        if not section.free_form:
            sections.setdefault(section.name, []).append(f"{UNDOCUMENTED} = 1")
    (base / "gateway.toml").write_text(render(sections, top=[f"{UNDOCUMENTED} = 1"]))
    with pytest.raises(SettingsError) as caught:
        load_settings(base / "gateway.toml", {})
    problems = [str(p) for p in caught.value.problems]
    keys = documented_keys()
    tops = {s.name for s in SECTIONS if "." not in s.name}
    assert _allowed(problems, "") == tops
    for section in SECTIONS:
        if section.free_form:
            continue
        path = f"{section.name}[0]" if section.array else section.name
        tables = {
            s.name.rsplit(".", 1)[1] for s in SECTIONS if s.name.startswith(section.name + ".")
        }
        documented = {k.name for k in keys if k.section == section}
        assert _allowed(problems, path) == documented | tables, section.name
    assert len(problems) == len(SECTIONS) - 2 + 1  # one per table, and nothing else


# --- (c) the documented defaults are the dataclass defaults -----------------------------


# Optional, but one of the two must be given: minimal() gives the key files.
EITHER_OR = {("tokens.issuers", "keys")}


def test_leaving_every_key_out_gives_the_dataclass_defaults(base: Path) -> None:
    settings = load(base, render(minimal()))
    for key in documented_keys():
        if not key.required and (key.section.name, key.name) not in EITHER_OR:
            assert value_of(settings, key) == resolved(key.default, base), key.name


def test_writing_every_documented_default_gives_the_dataclass_defaults(base: Path) -> None:
    sections = minimal()
    written = [k for k in documented_keys() if default_toml(k) is not None]
    for key in written:
        sections.setdefault(key.section.name, []).append(f"{key.name} = {default_toml(key)}")
    settings = load(base, render(sections))
    for key in written:
        assert value_of(settings, key) == resolved(key.default, base), key.name
    block = generate()
    for key in written:
        assert f"| `{key.name}` | {key.setting.kind.written()} | `{default_toml(key)}` |" in block


def test_the_documented_defaults_read_as_an_admin_writes_them() -> None:
    shown = {(k.section.name, k.name): default_toml(k) for k in documented_keys()}
    assert shown["hold", "expire_after_hours"] == "120"  # timedelta(days=5), in hours
    assert shown["gateway", "inventory_retention_days"] == "30"
    assert shown["tokens", "leeway_seconds"] == "60"
    assert shown["smtp", "listen"] == '"127.0.0.1:2587"'
    assert shown["gateway", "policy_dir"] == '"policies"'
    assert shown["gateway", "max_newly_blocked_devices"] is None  # absent: no guard


# --- The hand-written production example is valid too ----------------------------------


def test_the_production_example_loads(base: Path) -> None:
    text = DOCUMENT.read_text(encoding="utf-8")
    example = text.split("## A production configuration", 1)[1].split("```toml\n", 1)[1]
    settings = load_settings(
        _write(base / "gateway.toml", example.split("```", 1)[0]),
        {
            "GATEWAY_SMTP__TLS_CERT": str(base / "cert.pem"),
            "GATEWAY_SMTP__TLS_KEY": str(base / "key.pem"),
            "GATEWAY_TOKENS__ISSUERS__0__KEYS": f'["{base / "mdm.jwks.json"}"]',
        },
    )
    assert settings.smtp.implicit_tls_listen is not None
    assert settings.smtp.implicit_tls_listen.port == 465
    assert not settings.smtp.allow_plaintext_auth
    assert settings.admin_listen is not None


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
