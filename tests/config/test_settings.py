"""gateway.toml and GATEWAY_… overrides: parsed once, every problem named by file, line, key."""

from __future__ import annotations

import shutil
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from gateway.config.settings import (
    Endpoint,
    HoldSettings,
    LimitSettings,
    SmtpSettings,
    load_settings,
)
from gateway.errors import SettingsError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def config(tmp_path: Path) -> Path:
    shutil.copytree(REPO / "config", tmp_path / "config")
    return tmp_path / "config" / "gateway.toml"


def problems(config: Path, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(SettingsError) as caught:
        load_settings(config, environ or {})
    return [str(p) for p in caught.value.problems]


def test_the_shipped_config_loads_with_its_limits(config: Path) -> None:
    settings = load_settings(config, {})
    assert settings.smtp.listen == Endpoint("127.0.0.1", 2587)
    assert settings.limits.max_connections_per_ip == 100
    assert settings.limits.messages_per_user_per_minute == 60
    assert settings.limits.command_call_limit == 1000


def test_a_bad_value_names_file_line_and_key(config: Path) -> None:
    text = config.read_text().replace("max_recipients = 100", "max_recipients = 0")
    config.write_text(text)
    line = text.splitlines().index(next(x for x in text.splitlines() if "max_recipients" in x)) + 1
    assert problems(config) == [f"{config}:{line}: smtp.max_recipients: must be at least 1, got 0"]


def test_a_misspelt_limit_is_suggested(config: Path) -> None:
    config.write_text(config.read_text().replace("max_errors =", "max_erors ="))
    (problem,) = problems(config)
    assert problem.endswith("limits.max_erors: unknown key (did you mean 'max_errors'?)")


def test_environment_overrides_take_toml_values_or_plain_text(config: Path) -> None:
    settings = load_settings(
        config,
        {
            "GATEWAY_SMTP__LISTEN": "[::]:587",  # not TOML: taken as text
            "GATEWAY_SMTP__MAX_RECIPIENTS": "7",
            "GATEWAY_SMTP__ALLOW_PLAINTEXT_AUTH": "false",
            "GATEWAY_LIMITS__MESSAGES_PER_USER_PER_MINUTE": "5",
            "GATEWAY_UPSTREAM__SMARTHOSTS__0__HOST": "relay.internal",
            "GATEWAY_HOLD__DATABASE": '"/var/lib/gateway/hold.db"',  # TOML string
            "GATEWAY_ADMIN__LISTEN": "[::1]:9587",
        },
    )
    assert settings.smtp.listen == Endpoint("::", 587)
    assert settings.smtp.max_recipients == 7
    assert settings.smtp.allow_plaintext_auth is False
    assert settings.limits.messages_per_user_per_minute == 5
    assert settings.upstream.smarthosts[0].host == "relay.internal"
    assert settings.upstream.smarthosts[0].port == 2525  # the rest of the table is kept
    assert settings.hold.database == Path("/var/lib/gateway/hold.db")
    assert settings.admin_listen == Endpoint("::1", 9587)


def test_environment_can_add_a_section_the_file_lacks(config: Path) -> None:
    text = config.read_text()
    config.write_text(text[: text.index("[limits]")] + text[text.index("[tokens]") :])
    settings = load_settings(config, {"GATEWAY_LIMITS__MAX_CONNECTIONS": "3"})
    assert settings.limits.max_connections == 3


def test_unrelated_environment_variables_are_ignored(config: Path) -> None:
    # A Kubernetes Service named "gateway" injects these into every pod.
    environ = {
        "GATEWAY_PORT": "tcp://10.0.0.1:2587",
        "GATEWAY_SERVICE_HOST": "10.0.0.1",
        "GATEWAY_CONFIG": str(config),
    }
    assert load_settings(config, environ).smtp.listen.port == 2587


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        (
            "GATEWAY_SMTP__MAX_RECIPIENTS",
            "many",
            "environment GATEWAY_SMTP__MAX_RECIPIENTS: smtp.max_recipients: "
            "expected an integer, got a string",
        ),
        (
            "GATEWAY_SMTP__LISTEN",
            "everywhere",
            "environment GATEWAY_SMTP__LISTEN: smtp.listen: 'everywhere' is not host:port "
            "(e.g. 127.0.0.1:2587 or [::1]:2587)",
        ),
        (
            "GATEWAY_SMTP__MAX_RECIPENTS",
            "5",
            "environment GATEWAY_SMTP__MAX_RECIPENTS: smtp.max_recipents: "
            "unknown key (did you mean 'max_recipients'?)",
        ),
        (
            "GATEWAY_SMTP__LISTEN__HOST",
            "x",
            "environment GATEWAY_SMTP__LISTEN__HOST: smtp.listen.host: does not name a setting "
            "(GATEWAY_<SECTION>__<KEY>, e.g. GATEWAY_SMTP__LISTEN)",
        ),
    ],
)
def test_a_bad_override_names_the_variable(
    config: Path, name: str, value: str, expected: str
) -> None:
    assert problems(config, {name: value}) == [expected]


def test_command_call_limit_per_command(config: Path) -> None:
    text = config.read_text().replace(
        "command_call_limit = 1000", 'command_call_limit = { "*" = 500, noop = 20 }'
    )
    config.write_text(text)
    assert load_settings(config, {}).limits.command_call_limit == {"*": 500, "NOOP": 20}


def test_serve_refuses_to_start_with_one_line_naming_the_variable(config: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--config", str(config)],
        env={"PATH": "/usr/bin:/bin", "GATEWAY_LIMITS__MAX_ERRORS": "0"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "gateway: environment GATEWAY_LIMITS__MAX_ERRORS: limits.max_errors: "
        "must be at least 1, got 0"
    ]


def test_nameservers_for_mx_mode(config: Path) -> None:
    environ = {"GATEWAY_UPSTREAM__NAMESERVERS": '["127.0.0.1:5353", "::1", "[::1]:53", "9.9.9.9"]'}
    servers = load_settings(config, environ).upstream.nameservers
    assert [str(s) for s in servers] == ["127.0.0.1:5353", "[::1]:53", "[::1]:53", "9.9.9.9:53"]
    assert problems(config, {"GATEWAY_UPSTREAM__NAMESERVERS": '["dns.google"]'}) == [
        "environment GATEWAY_UPSTREAM__NAMESERVERS: upstream.nameservers[0]: "
        "'dns.google' is not an IP address (with an optional :port)"
    ]


def test_an_explicit_zero_stays_where_zero_is_valid(config: Path) -> None:
    text = config.read_text().replace("leeway_seconds = 60", "leeway_seconds = 0")
    text = text.replace("max_newly_blocked_devices = 50", "max_newly_blocked_devices = 0")
    config.write_text(text)
    settings = load_settings(config, {"GATEWAY_SMTP__GREETING_DELAY": "0"})
    assert settings.tokens.leeway == timedelta(0)
    assert settings.max_newly_blocked_devices == 0
    assert settings.smtp.greeting_delay == 0.0


def test_an_empty_hostname_still_means_the_default(config: Path) -> None:
    assert load_settings(config, {"GATEWAY_SMTP__HOSTNAME": '""'}).smtp.hostname == "localhost"


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("GATEWAY_SMTP__BARE_LINEFEEDS", "strip", "'strip' is not one of: reject, normalize"),
        ("GATEWAY_UPSTREAM__MODE", "direct", "'direct' is not one of: smarthost, mx"),
        (
            "GATEWAY_UPSTREAM__SMARTHOSTS__0__TLS",
            "ssl",
            "'ssl' is not one of: none, starttls, tls",
        ),
    ],
)
def test_choices_come_from_the_literal_types(
    config: Path, name: str, value: str, expected: str
) -> None:
    (problem,) = problems(config, {name: value})
    assert problem.endswith(expected)


def test_tls_cert_without_tls_key(config: Path) -> None:
    (config.parent / "cert.pem").write_text("x")
    assert problems(config, {"GATEWAY_SMTP__TLS_CERT": "cert.pem"}) == [
        "environment GATEWAY_SMTP__TLS_CERT: smtp.tls_cert: tls_cert and tls_key go together"
    ]


def test_sections_left_out_take_the_dataclass_defaults(config: Path) -> None:
    text = config.read_text()
    for section in ("[gateway]", "[smtp]", "[limits]", "[admin]", "[hold]"):
        start = text.index(section)
        end = text.index("\n[", start + 1)
        text = text[:start] + text[end + 1 :]
    config.write_text(text)
    settings = load_settings(config, {})
    assert settings.smtp == SmtpSettings()
    assert settings.limits == LimitSettings()
    assert settings.hold == HoldSettings()
    assert settings.admin_listen is None
    assert settings.policy_dir == config.parent / "policies"
    assert settings.reload_interval == 30.0
    assert settings.inventory_retention == timedelta(days=30)


def test_proxy_protocol_networks_must_be_networks(config: Path) -> None:
    """A host address with a prefix (10.0.0.5/24) is refused, not widened silently: the
    list says who may claim any client address (docs/operations.md#behind-a-load-balancer)."""
    text = config.read_text().replace(
        "[smtp]\n", '[smtp]\nproxy_protocol_from = ["10.0.0.5/24"]\n', 1
    )
    config.write_text(text)
    (problem,) = problems(config)
    assert "smtp.proxy_protocol_from: '10.0.0.5/24' is not a network" in problem
    config.write_text(text.replace("10.0.0.5/24", "10.0.0.5"))
    assert [str(n) for n in load_settings(config, {}).smtp.proxy_protocol_from] == ["10.0.0.5/32"]


@pytest.mark.parametrize("listen", ["0.0.0.0:2587", "[::]:587", "192.0.2.10:587"])
def test_plaintext_auth_is_refused_off_loopback(config: Path, listen: str) -> None:
    """As Postfix's smtpd_tls_auth_only: tokens never cross a network in clear."""
    text = config.read_text().replace('listen = "127.0.0.1:2587"', f'listen = "{listen}"')
    config.write_text(text)
    line = 1 + text.splitlines().index(
        next(x for x in text.splitlines() if x.startswith("allow_plaintext_auth"))
    )
    (problem,) = problems(config)
    assert problem.startswith(f"{config}:{line}: smtp.allow_plaintext_auth: AUTH without TLS on ")
    assert "set tls_cert and tls_key" in problem
    # An override names the variable that put the listener on the network.
    config.write_text(text.replace(f'listen = "{listen}"', 'listen = "127.0.0.1:2587"'))
    (problem,) = problems(config, {"GATEWAY_SMTP__LISTEN": "0.0.0.0:2587"})
    assert "smtp.allow_plaintext_auth: AUTH without TLS on 0.0.0.0:2587" in problem
    assert load_settings(config, {"GATEWAY_SMTP__LISTEN": "[::1]:2587"}).smtp.allow_plaintext_auth


def test_upstream_credentials_over_plain_tcp_are_refused(config: Path) -> None:
    (config.parent / "relay.secret").write_text("s3cret\n")
    text = config.read_text().replace(
        'tls = "none"', 'tls = "none"\nusername = "gw"\npassword_file = "relay.secret"'
    )
    config.write_text(text)
    line = 1 + text.splitlines().index(next(x for x in text.splitlines() if x.startswith("tls =")))
    (problem,) = problems(config)
    assert problem.startswith(
        f"{config}:{line}: upstream.smarthosts[0].tls: smarthost 127.0.0.1:2525"
    )
    assert 'tls = "none"' in problem
    settings = load_settings(config, {"GATEWAY_UPSTREAM__SMARTHOSTS__0__TLS": "starttls"})
    assert settings.upstream.smarthosts[0].password == "s3cret"
